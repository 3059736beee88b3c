"""robustft-train's bigger contrastive batches: --accum-freq (feature-cached accumulation) gives
the step of one batch of batch x K (every method and term, on the embedded default), at the peak
memory of one micro-batch; it resumes bit for bit and runs under bf16; the re-run of a micro-batch
draws what its first run drew; --accum-steps stays plain accumulation, another objective."""
from __future__ import annotations

import json
import math
import os

import pytest
import torch

pytest.importorskip("open_clip", exc_type=ImportError)  # robustft_train imports it

from robustft_train import checkpoint, feature_cache
from robustft_train.cli import main
from robustft_train.config import resolve
from robustft_train.data import TrainView
from robustft_train.distributed import DistInfo
from robustft_train.embedded import build
from robustft_train.flags import training_parser
from robustft_train.losses import MethodLoss
from robustft_train.methods import parse_method
from robustft_train.models import EMBEDDED_MODEL_CONFIG, FrozenEncoders, TrainModule, build_clip, get_tokenizer, \
    register_config
from robustft_train.runner import EXIT_STOPPED

METHODS = ["flyp+m2mix+dive+lipsum", "ft+lipsum"]
# the whole embedded default's data (297 training images: two steps of 128 per epoch)
EMBEDDED = ["--pretrain-epochs", "1", "--epochs", "2", "--methods", ",".join(METHODS), "--wise-ft-alphas", "1",
            "--no-plots", "--lipsum-num-texts", "16"]


@pytest.fixture(autouse=True)
def _keep_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _log(run_dir: str, phase: str) -> list[dict]:
    with open(os.path.join(run_dir, "logs", f"{phase}.jsonl")) as f:
        return [json.loads(line) for line in f]


def _weights(run_dir: str, phase: str) -> dict[str, torch.Tensor]:
    return checkpoint.load(os.path.join(run_dir, "checkpoints", phase, "final.pt"), advice="")["model"]


@pytest.fixture(scope="module")
def batch_runs(tmp_path_factory):
    """The same seed at --batch-size 32 --accum-freq 4, --batch-size 128, --batch-size 32 --accum-steps 4."""
    root = tmp_path_factory.mktemp("batch")
    runs = {}
    for name, flags in (("accum_freq", ["--batch-size", "32", "--accum-freq", "4"]),
                        ("one_batch", ["--batch-size", "128"]),
                        ("accum_steps", ["--batch-size", "32", "--accum-steps", "4"])):
        runs[name] = str(root / name)
        n = torch.get_num_threads()
        assert main(EMBEDDED + flags + ["--run-dir", runs[name]]) == 0, name
        torch.set_num_threads(n)
    return runs


def test_accum_freq_gives_the_step_of_one_batch_of_batch_times_k(batch_runs):
    cached, single = batch_runs["accum_freq"], batch_runs["one_batch"]
    # the embedded pre-training keeps its own recipe whatever the fine-tuning's batch flags
    for k, v in _weights(single, "pretrain").items():
        assert torch.equal(v, _weights(cached, "pretrain")[k]), k
    for method in METHODS:
        a, b = _log(cached, method), _log(single, method)
        assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3, 4]
        for ra, rb in zip(a, b):  # every term of every step: CLIP, m^2 (mixed negatives), Lipsum, DiVE, ce
            terms = [k for k in rb if k.startswith("loss")]
            assert terms == [k for k in ra if k.startswith("loss")]
            for key in terms:
                assert math.isfinite(ra[key]) and ra[key] == pytest.approx(rb[key], rel=1e-5, abs=1e-8), (method, key)
        lr_sum = sum(r["lr"] for r in b)
        wa, wb = _weights(cached, method), _weights(single, method)
        for k in wb:
            if k.endswith("attn.in_proj_bias"):
                # its key third has a zero gradient in exact arithmetic (softmax ignores a per-query
                # constant); Adam turns the rounding noise there into steps of up to lr each
                torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=lr_sum, msg=k)
            else:
                torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-5, msg=k)


def test_accum_steps_is_the_mean_of_smaller_batches_not_one_big_batch(batch_runs):
    """Plain accumulation: each micro-batch's CLIP term sees its own 31 negatives, not 127."""
    plain = _log(batch_runs["accum_steps"], METHODS[0])[0]
    single = _log(batch_runs["one_batch"], METHODS[0])[0]
    assert single["loss_clip"] - plain["loss_clip"] > 0.5, (plain["loss_clip"], single["loss_clip"])


def test_the_help_says_which_objective_each_accumulation_gives():
    text = " ".join(training_parser().format_help().split())
    assert "together form ONE contrastive batch of batch x K x processes" in text
    assert "each its OWN contrastive batch" in text and "not the loss of one N times larger batch" in text


def test_accum_freq_and_accum_steps_together_are_refused(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--accum-freq", "2", "--accum-steps", "2", "--run-dir", "unused"])
    assert e.value.code == 2 and "--accum-freq 2 and --accum-steps 2: give one of them" in capsys.readouterr().err


SMALL = ["--embedded-fraction", "0.3", "--pretrain-epochs", "0", "--epochs", "2", "--wise-ft-alphas", "1",
         "--no-plots", "--batch-size", "16", "--accum-freq", "2", "--dive-ref-batch-size", "8"]


def test_accum_freq_resumes_to_the_same_weights(tmp_path):
    method = "flyp+m2mix+dive"  # a lam and reference pairs per step, a DiVE centre
    args = SMALL + ["--methods", method]
    straight, broken = str(tmp_path / "straight"), str(tmp_path / "broken")
    assert main(args + ["--run-dir", straight]) == 0
    assert main(args + ["--run-dir", broken, "--stop-after-steps", "1"]) == EXIT_STOPPED
    assert main(["--resume", "--run-dir", broken]) == 0
    assert [r["loss"] for r in _log(straight, method)] == [r["loss"] for r in _log(broken, method)]
    a, b = _weights(straight, method), _weights(broken, method)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_accum_freq_under_bf16_matches_one_batch_to_bf16_rounding(tmp_path):
    runs = {}
    for name, flags in (("cached", ["--accum-freq", "2"]), ("single", ["--batch-size", "32", "--accum-freq", "1"])):
        runs[name] = str(tmp_path / name)
        assert main(SMALL + ["--methods", "flyp", "--precision", "bf16"] + flags + ["--run-dir", runs[name]]) == 0
    a, b = _log(runs["cached"], "flyp"), _log(runs["single"], "flyp")
    assert len(a) == len(b) == 4
    for ra, rb in zip(a, b):
        assert math.isfinite(ra["loss"]) and ra["loss"] == pytest.approx(rb["loss"], rel=1e-2)


def _peak_mb(tmp_path, name: str, flags: list[str]) -> float:
    run_dir = str(tmp_path / name)
    assert main(["--pretrain-epochs", "0", "--methods", "flyp", "--epochs", "1", "--wise-ft-alphas", "1",
                 "--no-plots", "--measure-memory", *flags, "--run-dir", run_dir]) == 0
    with open(os.path.join(run_dir, "training.json")) as f:
        return json.load(f)["phases"]["flyp"]["peak_memory_mb"]


def test_peak_memory_grows_with_the_micro_batch_not_with_k(tmp_path):
    """The peak tensor memory of fine-tuning (activations, gradients, optimiser state, the kept
    rows), counted by --measure-memory: K = 8 micro-batches of 32 stay at the peak of one batch of
    32 (plus the rows they keep), far below one batch of 256."""
    micro = _peak_mb(tmp_path, "micro", ["--batch-size", "32"])
    cached = _peak_mb(tmp_path, "cached", ["--batch-size", "32", "--accum-freq", "8"])
    whole = _peak_mb(tmp_path, "whole", ["--batch-size", "256"])
    assert whole - micro > 5, (micro, cached, whole)  # the activations of 224 more images
    assert cached - micro < 0.2 * (whole - micro), (micro, cached, whole)


def _patch_dropout_setup(tmp_path):
    """A tiny ViT with patch dropout (open_clip's, drawn from torch's global RNG), its loss and a
    step of 3 micro-batches of 8."""
    config = dict(EMBEDDED_MODEL_CONFIG, vision_cfg=dict(EMBEDDED_MODEL_CONFIG["vision_cfg"], patch_dropout=0.5))
    name = register_config("robustft-tiny-vit-patch-dropout", config, str(tmp_path))
    torch.manual_seed(0)
    clip = build_clip(name, None, torch.device("cpu"))
    _, train, _, templates = build(0.3)
    view = TrainView(train.dataset, train.classnames, templates, 0)
    tokenizer = get_tokenizer(name)
    method = parse_method("flyp+m2mix+lipsum")
    cfg = resolve(dict(methods=method.spec, lipsum_num_texts=8))
    loss_fn = MethodLoss(method, cfg, 0, 1, FrozenEncoders(clip), tokenizer, view)
    items = [view[(0, i)] for i in range(24)]
    batches = [feature_cache.MicroBatch(torch.stack([it[0] for it in items[k:k + 8]]),
                                        torch.tensor([it[1] for it in items[k:k + 8]]),
                                        tokenizer([it[2] for it in items[k:k + 8]])) for k in (0, 8, 16)]
    return TrainModule(clip).train(), loss_fn, batches


def test_a_micro_batch_runs_again_with_the_random_draws_of_its_first_run(tmp_path):
    """With patch dropout on, the cached step's gradient is that of the K micro-batches' first
    runs (one after the other from the same RNG state) under one loss, and the RNG ends where
    those runs left it: the re-runs drew what the first runs drew."""
    module, loss_fn, batches = _patch_dropout_setup(tmp_path)
    info = DistInfo()
    ctx = feature_cache.StepContext(module, module, loss_fn, info, None, torch.amp.GradScaler("cpu", enabled=False),
                                    step=0)
    torch.manual_seed(5)
    terms = feature_cache.cached_step(batches, loss_fn.step_inputs(0, info.device), ctx, lambda t: None)
    rng_after = torch.get_rng_state()
    cached = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
    module.zero_grad()

    torch.manual_seed(5)
    outs = [module(b.images, b.texts) for b in batches]
    rng_reference = torch.get_rng_state()
    out = {k: torch.cat([o[k] for o in outs]) for k in ("image_features", "text_features")}
    out["logit_scale"] = outs[0]["logit_scale"]
    images = torch.cat([b.images for b in batches])
    reference = loss_fn(out, torch.cat([b.labels for b in batches]), loss_fn.pre_image_features(images),
                        loss_fn.step_inputs(0, info.device), 0)
    sum(reference.values()).backward()
    assert terms == pytest.approx({k: v.item() for k, v in reference.items()}, rel=1e-6)
    for name, p in module.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(cached[name], p.grad, rtol=1e-4, atol=1e-6, msg=name)
    assert torch.equal(rng_after, rng_reference)
