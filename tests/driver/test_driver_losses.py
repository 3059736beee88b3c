"""robustft-train's step loss: every CLIP/FLYP, m^2-mix, Lipsum-FT and DiVE term of a step comes from
one robustft_ext.RobustFTLoss call, with the numbers (values and gradients, DiVE's centre over
steps) of the separate modules ClipLoss, M2MixLoss, DiVELoss and LipsumLoss; ft keeps its
cross-entropy. A short run counts the calls."""
from __future__ import annotations

import copy
import json
import os

import pytest
import robustft_ext as rft
import torch
import torch.nn.functional as F

open_clip = pytest.importorskip("open_clip", exc_type=ImportError)

from helpers import assert_close_rel
from robustft_train import embedded
from robustft_train.cli import main
from robustft_train.config import resolve
from robustft_train.data import TrainView
from robustft_train.losses import MethodLoss, step_seed
from robustft_train.methods import parse_method
from robustft_train.models import EMBEDDED_MODEL_CONFIG, FrozenEncoders, TrainModule, get_tokenizer, register_config

WEIGHTS = {"m2mix_weight": 0.3, "dive_lambda": 7.0, "lipsum_lambda": 2.0}
SEED = 5


@pytest.fixture(autouse=True)
def _keep_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    name = register_config("loss-test-tiny", EMBEDDED_MODEL_CONFIG, str(tmp_path_factory.mktemp("cfg")))
    torch.manual_seed(0)
    clip = open_clip.create_model(name).eval()
    _, train, _, templates = embedded.build(0.2)
    view = TrainView(train.dataset, train.classnames, templates, SEED)
    return clip, get_tokenizer(name), view


def _moved(clip, head: bool):
    """A copy of the zero-shot model moved away from it (so that DiVE and Lipsum are not zero)."""
    module = TrainModule(copy.deepcopy(clip), torch.nn.Linear(64, 5, bias=False) if head else None)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    return module.train()


def _separate(method, cfg, frozen, tokenizer, out, labels, images, inputs, step, dive_module):
    """The same terms from the separate modules, seeded as the driver seeds them."""
    img, scale = out["image_features"], out["logit_scale"]
    terms = {}
    if method.base == "ft":
        terms["ce"] = F.cross_entropy(out["logits"].float(), labels)
    else:
        terms["clip"] = rft.ClipLoss()(img, out["text_features"], scale)
    if "m2mix" in method.regularisers:
        gen = torch.Generator().manual_seed(step_seed(SEED, step, 29))
        terms["m2mix"] = rft.M2MixLoss(alpha=cfg.m2mix_alpha, generator=gen, m2_weight=cfg.m2mix_weight,
                                       clip_weight=0.0, m2_logit_scale=cfg.m2mix_logit_scale)(img, out["text_features"], scale)
    if "lipsum" in method.regularisers:
        lip = rft.LipsumLoss(weight=cfg.lipsum_lambda, num_texts=cfg.lipsum_num_texts, text_length=cfg.lipsum_text_length)
        texts = lip.random_text_features(frozen.clip, tokenizer, torch.Generator().manual_seed(step_seed(SEED, step, 43)))
        terms["lipsum"] = lip(img, frozen.image_features(images), texts.float(), frozen.logit_scale)
    if "dive" in method.regularisers:
        terms["dive"] = dive_module(out["extra_image_features"], out["extra_text_features"],
                                    frozen.image_features(inputs.extra_images), frozen.text_features(inputs.extra_texts))
    return terms


@pytest.mark.parametrize("spec", ["flyp", "flyp+m2mix", "flyp+dive", "ft+lipsum", "flyp+lipsum",
                                  "flyp+m2mix+lipsum+dive"])
def test_one_robust_ft_loss_call_gives_the_separate_terms(setup, spec, monkeypatch):
    clip, tokenizer, view = setup
    method = parse_method(spec)
    cfg = resolve(dict(WEIGHTS, methods=spec, seed=SEED, dive_ref_batch_size=6, lipsum_num_texts=9))
    frozen = FrozenEncoders(clip)
    calls = []
    forward = rft.RobustFTLoss.forward
    monkeypatch.setattr(rft.RobustFTLoss, "forward", lambda self, *a, **k: calls.append(1) or forward(self, *a, **k))
    module_a = _moved(clip, method.base == "ft")
    module_b = copy.deepcopy(module_a)
    loss_fn = MethodLoss(method, cfg, 0, 1, frozen, tokenizer, view)
    dive = rft.DiVELoss(weight=cfg.dive_lambda, momentum=cfg.dive_momentum)
    for step in range(2):  # two steps: DiVE's centre moves after the first
        items = [view[(0, i)] for i in range(8 * step, 8 * step + 8)]
        images = torch.stack([it[0] for it in items])
        labels = torch.tensor([it[1] for it in items])
        texts = tokenizer([it[2] for it in items]) if method.base == "flyp" else None
        inputs = loss_fn.step_inputs(step, torch.device("cpu"))
        calls.clear()
        out_a = module_a(images, texts, inputs.extra_images, inputs.extra_texts)
        ours = loss_fn(out_a, labels, loss_fn.pre_image_features(images), inputs, step)
        assert len(calls) == (0 if spec == "ft" else 1), "one RobustFTLoss call per step"
        out_b = module_b(images, texts, inputs.extra_images, inputs.extra_texts)
        theirs = _separate(method, cfg, frozen, tokenizer, out_b, labels, images, inputs, step, dive)
        assert ours.keys() == theirs.keys()
        for k in ours:
            torch.testing.assert_close(ours[k], theirs[k].float(), rtol=2e-5, atol=1e-7, msg=lambda m: f"{spec} {k}: {m}")
        if "dive" in theirs and step == 1:
            assert ours["dive"] > 0
        sum(ours.values()).backward()
        sum(theirs.values()).backward()
        for (name, pa), pb in zip(module_a.named_parameters(), module_b.parameters()):
            if pa.grad is not None or pb.grad is not None:
                # float32, two kernels against one: relative to the tensor's largest entry; a
                # parameter that only one side reads (ft+lipsum's unused logit scale) gets zeros
                ga = torch.zeros_like(pa) if pa.grad is None else pa.grad
                gb = torch.zeros_like(pb) if pb.grad is None else pb.grad
                assert_close_rel(ga, gb, 1e-4, f"{spec} d{name}")
        module_a.zero_grad()
        module_b.zero_grad()
    if "dive" in method.regularisers:
        torch.testing.assert_close(loss_fn.state_dict()["dive"]["center"], dive.center)


def test_a_run_calls_only_robust_ft_loss(tmp_path, monkeypatch):
    """flyp+m2mix+dive and ft+lipsum for a few steps: one RobustFTLoss call per step (pre-training
    included), never the separate modules."""
    counts = {"RobustFTLoss": 0, "ClipLoss": 0, "M2MixLoss": 0, "DiVELoss": 0, "LipsumLoss": 0}
    for name in counts:
        cls = getattr(rft, name)
        original = cls.forward

        def counted(self, *a, _name=name, _original=original, **k):
            counts[_name] += 1
            return _original(self, *a, **k)

        monkeypatch.setattr(cls, "forward", counted)
    run_dir = str(tmp_path / "run")
    assert main(["--embedded-fraction", "0.3", "--pretrain-epochs", "1", "--epochs", "1", "--wise-ft-alphas", "1",
                 "--no-plots", "--dive-ref-batch-size", "8", "--methods", "flyp+m2mix+dive,ft+lipsum",
                 "--run-dir", run_dir]) == 0
    phases = json.load(open(os.path.join(run_dir, "training.json")))["phases"]
    steps = sum(p["steps"] for p in phases.values())
    assert set(phases) == {"pretrain", "flyp+m2mix+dive", "ft+lipsum"} and steps > 0
    assert counts["RobustFTLoss"] == steps
    assert counts["ClipLoss"] == counts["M2MixLoss"] == counts["DiVELoss"] == counts["LipsumLoss"] == 0
