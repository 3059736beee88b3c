"""robustft-train analyze-sharpness (docs/sharpness.md): the estimators against closed forms on a
quadratic, the adaptive perturbation's scaling and seeding, the sparsity intervention's exact
fraction, the CLIP classification problem's gradients and caching, and the analysis end to end on
the tiny embedded model, through the subcommand, a reused run, explicit checkpoints and bad input."""
from __future__ import annotations

import copy
import csv
import json
import math
import os

import pytest
import torch

pytest.importorskip("open_clip", exc_type=ImportError)  # robustft_train imports it

from robustft_train import checkpoint
from robustft_train.cli import main
from robustft_train.config import parse_straggler_rule
from robustft_train.sharpness import estimators as sh

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True)
def _keep_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


# ---------------------------------------------------------------------------------------------
# a quadratic: L(theta) = 1/2 (theta - c)^T H (theta - c), theta = (a, b)


def _quadratic(seed: int = 0, d: int = 7):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(d, d, generator=g, dtype=torch.float64)
    h = a @ a.T + 0.5 * torch.eye(d, dtype=torch.float64)
    c = torch.randn(d, generator=g, dtype=torch.float64)
    params = {"a": torch.randn(3, generator=g, dtype=torch.float64) + 1.0,
              "b": torch.randn(d - 3, generator=g, dtype=torch.float64) - 1.0}

    def fn(p):
        t = torch.cat([p["a"], p["b"]]) - c
        return 0.5 * t @ h @ t

    return params, fn, h, c


GROUPS = {"A": ["a"], "B": ["b"]}


def test_random_sharpness_of_a_quadratic_matches_its_closed_form():
    """E[L(theta + eps)] - L(theta) = 1/2 sum_i H_ii (rho theta_i)^2 for eps ~ N(0, (rho |theta|)^2) (the
    first-order term has mean zero), for a group (its block of H) and for all groups at once."""
    params, fn, h, _ = _quadratic()
    rho, samples = 0.1, 3000
    res = sh.estimate(sh.FunctionProblem(params, fn), GROUPS, rho, samples, seed=0)
    theta = torch.cat([params["a"], params["b"]])
    terms = 0.5 * torch.diag(h) * (rho * theta) ** 2
    exact = {"A": float(terms[:3].sum()), "B": float(terms[3:].sum()), sh.OVERALL: float(terms.sum())}
    for g, value in exact.items():
        assert abs(res.random[g] - value) < 4 * res.random_se[g], (g, res.random[g], value, res.random_se[g])
        assert res.random[g] == pytest.approx(value, rel=0.06)
    # exactly, for the draws the estimator made: antithetic pairs cancel the linear term, leaving
    # 1/2 mean_z (eps^T H eps) with eps = rho |theta| z and z from the documented per-parameter seeds
    small = sh.estimate(sh.FunctionProblem(params, fn), GROUPS, rho, 5, seed=3, worst=False)
    quad = []
    for s in range(5):
        eps = torch.cat([sh.adaptive_noise(params[k], rho, sh.noise_seed(3, s, i)) for i, k in enumerate(params)])
        quad.append(0.5 * float(eps @ h @ eps))
    assert small.random[sh.OVERALL] == pytest.approx(sum(quad) / 5, rel=1e-9, abs=1e-12)


def test_worst_case_sharpness_of_a_quadratic_matches_its_closed_form():
    """eps = rho T^2 g / ||T g|| (T = |theta|, g the gradient restricted to the group);
    S = g . eps + 1/2 eps^T H eps exactly for a quadratic; the adaptive norm ||eps / T|| is rho."""
    params, fn, h, c = _quadratic(seed=1)
    rho = 0.2
    res = sh.estimate(sh.FunctionProblem(params, fn), GROUPS, rho, 1, seed=0)
    theta = torch.cat([params["a"], params["b"]])
    grad = h @ (theta - c)
    for g, sl in (("A", slice(0, 3)), ("B", slice(3, None)), (sh.OVERALL, slice(None))):
        mask = torch.zeros_like(theta)
        mask[sl] = 1.0
        t, gg = theta.abs() * mask, grad * mask
        eps = rho * t ** 2 * gg / (t * gg).norm()
        exact = float(grad @ eps + 0.5 * eps @ h @ eps)
        assert res.worst[g] == pytest.approx(exact, rel=1e-10), g
        assert float((eps[sl] / theta[sl].abs()).norm()) == pytest.approx(rho)
        assert res.worst[g] > 0
    # a first-order ascent step: better than any of 200 random directions of the same adaptive norm
    gen = torch.Generator().manual_seed(0)
    for _ in range(200):
        u = torch.randn(theta.shape, generator=gen, dtype=torch.float64)
        eps = rho * theta.abs() * u / u.norm()
        assert fn({"a": params["a"] + eps[:3], "b": params["b"] + eps[3:]}) - fn(params) <= res.worst[sh.OVERALL] + 1e-12


class _Recording(sh.FunctionProblem):
    """Records the perturbation of every parameter at each loss evaluation."""

    def __init__(self, params, fn):
        super().__init__(params, fn)
        self.base = {k: v.clone() for k, v in params.items()}
        self.deltas = []

    def loss(self, changed):
        self.deltas.append({k: (self.params[k] - self.base[k]).clone() for k in changed})
        return super().loss(changed)


def test_adaptive_perturbation_scales_with_the_layer_weights():
    """Multiplying a layer's weights by c multiplies its perturbation by |c| (same seed); the other
    layer's perturbation does not change."""
    params, fn, _, _ = _quadratic(seed=2)
    c = 3.5
    rec1 = _Recording({k: v.clone() for k, v in params.items()}, fn)
    sh.estimate(rec1, GROUPS, 0.07, 3, seed=11, worst=False)
    scaled = {k: v.clone() for k, v in params.items()}
    scaled["a"] *= c
    rec2 = _Recording(scaled, fn)
    sh.estimate(rec2, GROUPS, 0.07, 3, seed=11, worst=False)
    assert len(rec1.deltas) == len(rec2.deltas) == 1 + 3 * 2 * 3  # base + (A, B, overall) x samples x (+-)
    for d1, d2 in zip(rec1.deltas, rec2.deltas):
        assert d1.keys() == d2.keys()
        for k in d1:
            factor = c if k == "a" else 1.0
            torch.testing.assert_close(d2[k], factor * d1[k], rtol=1e-12, atol=1e-14)
    # directly, and for a negative factor: |c|
    theta = torch.randn(5, 4, dtype=torch.float64)
    torch.testing.assert_close(sh.adaptive_noise(-2.0 * theta, 0.1, 5), 2.0 * sh.adaptive_noise(theta, 0.1, 5))
    # a group shares its noise with the overall perturbation (common random numbers)
    assert all(torch.equal(rec1.deltas[1]["a"], d["a"]) for d in rec1.deltas[13:14])


def test_estimate_is_reproducible_from_a_seed():
    params, fn, _, _ = _quadratic(seed=3)
    run = lambda seed: sh.estimate(sh.FunctionProblem({k: v.clone() for k, v in params.items()}, fn),
                                   GROUPS, 0.1, 4, seed=seed)
    a, b, other = run(7), run(7), run(8)
    assert a.random == b.random and a.worst == b.worst and a.random_se == b.random_se
    assert a.random != other.random
    assert a.worst == other.worst  # deterministic
    # the estimate leaves the parameters exactly as they were
    p = {k: v.clone() for k, v in params.items()}
    sh.estimate(sh.FunctionProblem(p, fn), GROUPS, 0.1, 2, seed=0)
    assert all(torch.equal(p[k], params[k]) for k in p)


def test_estimate_rejects_bad_arguments():
    params, fn, _, _ = _quadratic()
    with pytest.raises(ValueError, match="rho"):
        sh.estimate(sh.FunctionProblem(params, fn), GROUPS, 0.0, 2, 0)
    with pytest.raises(ValueError, match="samples"):
        sh.estimate(sh.FunctionProblem(params, fn), GROUPS, 0.1, 0, 0)


# ---------------------------------------------------------------------------------------------
# groups, stragglers, correlations, the intervention


def test_layer_groups_of_the_embedded_model():
    import open_clip

    from robustft_train.models import EMBEDDED_MODEL_CONFIG, EMBEDDED_MODEL_NAME, register_config

    clip = open_clip.create_model(register_config(EMBEDDED_MODEL_NAME, EMBEDDED_MODEL_CONFIG))
    names = ["clip." + n for n, _ in clip.named_parameters()] + ["head.weight"]
    groups = sh.layer_groups(names)
    assert list(groups) == ["visual.embed", "visual.block0", "visual.block1", "visual.proj",
                            "text.embed", "text.block0", "text.block1", "text.proj", "head"]
    assert set(groups["visual.embed"]) == {"clip.visual.class_embedding", "clip.visual.positional_embedding",
                                           "clip.visual.conv1.weight", "clip.visual.ln_pre.weight",
                                           "clip.visual.ln_pre.bias"}
    assert set(groups["text.proj"]) == {"clip.text_projection", "clip.ln_final.weight", "clip.ln_final.bias"}
    assert set(groups["text.embed"]) == {"clip.token_embedding.weight", "clip.positional_embedding"}
    assert len(groups["visual.block1"]) == 12
    grouped = {n for ns in groups.values() for n in ns}
    assert set(names) - grouped == {"clip.logit_scale"}


def test_straggler_selection():
    table = [{"a": 1.0, "b": 1.1, "c": 0.9, "d": 1.0, "e": 9.0}, {"a": 2.0, "b": 2.1, "c": 1.8, "d": 2.0, "e": 30.0}]
    scores = sh.straggler_scores(table, list(table[0]))
    assert max(scores, key=scores.get) == "e"
    assert sh.select_stragglers(scores, "std:1.5")[0] == ["e"]
    assert sh.select_stragglers(scores, "topk:2")[0][0] == "e" and len(sh.select_stragglers(scores, "topk:2")[0]) == 2
    flat = {"a": 0.0, "b": 0.0}
    chosen, note = sh.select_stragglers(flat, "std:2")
    assert len(chosen) == 1 and "top group" in note
    for bad in ("std", "std:-1", "topk:0", "topk:1.5", "max:2"):
        with pytest.raises(ValueError):
            parse_straggler_rule(bad)


def test_rank_correlations():
    from scipy.stats import kendalltau, spearmanr

    from robustft_train.sharpness.analysis import rank_correlations

    x, y = [0.1, 0.5, 0.2, 0.9, 0.7], [3.0, 1.0, 2.5, 0.5, 0.7]
    r = rank_correlations(x, y)
    assert r["spearman"] == pytest.approx(spearmanr(x, y).statistic)
    assert r["kendall"] == pytest.approx(kendalltau(x, y).statistic) and r["n"] == 5
    assert r["spearman"] == pytest.approx(-1.0)
    assert math.isnan(rank_correlations(x, [1.0] * 5)["spearman"])
    assert math.isnan(rank_correlations([1.0, 2.0], [2.0, 1.0])["kendall"])


@pytest.mark.parametrize("p", [0.0, 0.1, 0.37, 0.5, 0.99])
def test_sparsity_intervention_zeroes_exactly_the_requested_fraction(p):
    g = torch.Generator().manual_seed(1)
    zs = {"x": torch.randn(7, 5, generator=g), "y": torch.randn(13, generator=g), "z": torch.randn(4, 4, generator=g)}
    ft = {k: v + torch.randn(v.shape, generator=g) for k, v in zs.items()}
    names = ["x", "y"]
    out, info = sh.sparsify_task_vector(zs, ft, names, p)
    n = 35 + 13
    k = math.floor(p * n)
    assert info["entries"] == n and info["zeroed"] == k and info["kept"] == n - k
    tau = {m: out[m] - zs[m] for m in names}
    zero = sum(int((tau[m] == 0).sum()) for m in names)
    assert zero == k and info["tau_nonzero_after"] == n - k
    for m in names:  # kept entries keep their fine-tuned value exactly
        kept = tau[m] != 0
        assert torch.equal(out[m][kept], ft[m][kept]) and torch.equal(out[m][~kept], zs[m][~kept])
    assert torch.equal(out["z"], ft["z"])  # outside the straggler layers: unchanged
    if 0 < k < n:  # the smallest magnitudes went
        old = torch.cat([(ft[m] - zs[m]).flatten() for m in names]).abs()
        new = torch.cat([tau[m].flatten() for m in names])
        assert old[new == 0].max() <= old[new != 0].min()


def test_sparsity_intervention_rejects_p_outside_0_1():
    zs, ft = {"x": torch.zeros(3)}, {"x": torch.ones(3)}
    for p in (1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match=r"\[0, 1\)"):
            sh.sparsify_task_vector(zs, ft, ["x"], p)


# ---------------------------------------------------------------------------------------------
# the CLIP classification problem


def _tiny_problem(head: bool, chunk: int):
    import open_clip

    from robustft_train.models import (EMBEDDED_MODEL_CONFIG, EMBEDDED_MODEL_NAME, TrainModule, make_head,
                                       register_config)
    from robustft_train.sharpness.analysis import ClassificationProblem

    torch.manual_seed(0)
    name = register_config(EMBEDDED_MODEL_NAME, EMBEDDED_MODEL_CONFIG)
    clip = open_clip.create_model(name)
    tok = open_clip.get_tokenizer(name)
    classes, templates = ["zero", "one", "two"], ["a {}.", "the digit {}."]
    tokens = tok([t.format(c) for c in classes for t in templates])
    module = TrainModule(clip, make_head(torch.nn.functional.normalize(torch.randn(3, 64), dim=-1), 10.0)
                         if head else None)
    images, labels = torch.randn(6, 3, 32, 32), torch.tensor([0, 1, 2, 0, 1, 2])
    return ClassificationProblem(module, images, labels, tokens, 3, chunk=chunk, text_chunk=chunk), module


@pytest.mark.parametrize("head", [False, True])
def test_classification_problem_gradients_and_cache(head):
    problem, module = _tiny_problem(head, chunk=4)
    ref = copy.deepcopy(module)
    img = torch.nn.functional.normalize(ref.clip.encode_image(problem.images).float(), dim=-1)
    if head:
        logits = ref.head(img)
    else:
        txt = torch.nn.functional.normalize(ref.clip.encode_text(problem.tokens).float(), dim=-1)
        cls = torch.nn.functional.normalize(txt.view(3, 2, -1).mean(1), dim=-1)
        logits = ref.clip.logit_scale.exp() * img @ cls.T
    loss = torch.nn.functional.cross_entropy(logits, problem.labels)
    loss.backward()
    loss = loss.detach()
    value, grads = problem.loss_and_grads()
    assert value == pytest.approx(float(loss), rel=1e-6)
    assert problem.loss([]) == pytest.approx(float(loss), rel=1e-6)
    for n, p in ref.named_parameters():
        if n in problem.used:
            scale = float(p.grad.abs().max()) + 1e-12  # float32, a different summation order
            torch.testing.assert_close(grads[n], p.grad, rtol=1e-3, atol=1e-4 * scale)
    used_text = any(n.startswith("clip.transformer.") for n in problem.used)
    assert used_text == (not head)  # ft's head never reads the text tower
    # the cache: a perturbed loss equals a fresh evaluation of the perturbed model
    for name in ("clip.visual.transformer.resblocks.0.mlp.c_fc.weight", "clip.transformer.resblocks.1.attn.in_proj_weight"):
        eps = {name: 0.3 * problem.params[name].detach().abs()}
        cached = sh.perturbed_loss(problem, eps)
        with torch.no_grad():
            problem.params[name].add_(eps[name])
        fresh = problem.loss(list(problem.params))
        with torch.no_grad():
            problem.params[name].sub_(eps[name])
        assert cached == pytest.approx(fresh, rel=1e-6)
        if name.startswith("clip.transformer") and head:
            assert cached == pytest.approx(float(loss), rel=1e-6)


# ---------------------------------------------------------------------------------------------
# end to end on the tiny embedded model

SMALL = ["--embedded-fraction", "0.3", "--pretrain-epochs", "2", "--epochs", "3", "--wise-ft-alphas", "0,0.5,1",
         "--samples", "2", "--sparsity", "0.5,0.9", "--sharpness-batch-size", "32"]


def _read(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def sharp_run(tmp_path_factory):
    run_dir = str(tmp_path_factory.mktemp("sharp") / "run")
    n = torch.get_num_threads()
    code = main(["analyze-sharpness", "--run-dir", run_dir] + SMALL)
    torch.set_num_threads(n)
    assert code == 0
    return run_dir


def test_subcommand_trains_the_embedded_default_and_writes_finite_numbers_and_plots(sharp_run):
    out = os.path.join(sharp_run, "sharpness")
    for stem in ("layers", "alphas", "correlations", "intervention", "intervention_summary"):
        for ext in (".csv", ".jsonl"):
            assert os.path.getsize(os.path.join(out, stem + ext)) > 0, stem + ext
    for method in ("ft", "flyp"):
        for png in ("_layer_sharpness.png", "_ood_vs_alpha.png"):
            with open(os.path.join(out, method + png), "rb") as f:
                assert f.read(8) == PNG_MAGIC
    cfg = json.load(open(os.path.join(sharp_run, "config.json")))
    assert cfg["analyze_sharpness"] and cfg["sharpness_samples"] == 2 and cfg["methods"] == "ft,flyp"
    layers, alphas = _read(os.path.join(out, "layers.jsonl")), _read(os.path.join(out, "alphas.jsonl"))
    summary = json.load(open(os.path.join(out, "summary.json")))
    for method in ("ft", "flyp"):
        groups = summary["methods"][method]["groups"]
        lrows = [r for r in layers if r["method"] == method]
        assert len(lrows) == 3 * len(groups) and {r["alpha"] for r in lrows} == {0.0, 0.5, 1.0}
        for r in lrows:
            for key in ("sharpness_random", "sharpness_random_se", "sharpness_worst", "straggler_score"):
                assert r[key] is not None and math.isfinite(r[key]), (key, r)
        stragglers = summary["methods"][method]["stragglers"]
        assert stragglers and {r["group"] for r in lrows if r["straggler"]} == set(stragglers)
        arows = [r for r in alphas if r["method"] == method]
        assert [r["alpha"] for r in arows] == [0.0, 0.5, 1.0]
        for r in arows:
            for key in ("loss", "overall_random", "overall_worst", "straggler_random", "straggler_worst",
                        "id_top1", "ood_mean", "top1_rotate"):
                assert r[key] is not None and math.isfinite(r[key]), (key, r)
        heads = summary["methods"][method]["correlations_with_ood_mean"]
        assert set(heads) == {"overall_random", "straggler_random", "overall_worst", "straggler_worst"}
    assert "head" in summary["methods"]["ft"]["groups"]
    assert not any(g.startswith("text.") for g in summary["methods"]["ft"]["groups"])  # ft's loss: no text tower
    assert any(g.startswith("text.") for g in summary["methods"]["flyp"]["groups"])
    # alpha 0 is the zero-shot model for both (same loss; ft's head is the zero-shot head)
    a0 = {r["method"]: r for r in alphas if r["alpha"] == 0.0}
    assert a0["ft"]["id_top1"] == pytest.approx(a0["flyp"]["id_top1"])
    corr = _read(os.path.join(out, "correlations.jsonl"))
    assert {r["target"] for r in corr} >= {"ood_mean", "id_top1", "top1_noise"}
    inter = _read(os.path.join(out, "intervention_summary.jsonl"))
    assert {(r["method"], r["p"]) for r in inter} == {(m, p) for m in ("ft", "flyp") for p in (0.5, 0.9)}
    for r in inter:
        assert r["zeroed"] == math.floor(r["p"] * r["entries"]) and isinstance(r["improved"], bool)
        assert r["mean_ood_change"] is not None and math.isfinite(r["mean_ood_change"])
    irows = _read(os.path.join(out, "intervention.jsonl"))
    assert len(irows) == 2 * 2 * 3 and all(math.isfinite(r["ood_mean"]) for r in irows)
    # the driver's own outputs are there too
    assert os.path.exists(os.path.join(sharp_run, "results.csv"))


def test_analysis_of_a_finished_run_and_of_explicit_checkpoints(sharp_run, tmp_path):
    """--run-dir of a finished run re-analyses it; explicit checkpoints (one a plain open_clip state
    dict) give the same sharpness as the analysis inside the training run (same seed and batch)."""
    ck = os.path.join(sharp_run, "checkpoints")
    plain = str(tmp_path / "zeroshot_state_dict.pt")
    state = checkpoint.load(os.path.join(ck, "pretrain", "final.pt"), advice="")["model"]
    torch.save({k[len("clip."):]: v for k, v in state.items()}, plain)
    out = str(tmp_path / "explicit")
    code = main(["analyze-sharpness", "--zeroshot", plain, "--finetuned", os.path.join(ck, "ft", "final.pt"),
                 "--finetuned", "myflyp=" + os.path.join(ck, "flyp", "final.pt"), "--run-dir", out,
                 "--embedded-fraction", "0.3", "--wise-ft-alphas", "0,1", "--samples", "2",
                 "--sharpness-batch-size", "32", "--no-plots"])
    assert code == 0
    mine = {(r["method"], r["alpha"], r["group"]): r for r in _read(os.path.join(out, "sharpness", "layers.jsonl"))}
    theirs = {(r["method"], r["alpha"], r["group"]): r
              for r in _read(os.path.join(sharp_run, "sharpness", "layers.jsonl"))}
    assert {m for m, _, _ in mine} == {"ft", "myflyp"}
    for (m, a, g), r in mine.items():
        other = theirs[("flyp" if m == "myflyp" else m, a, g)]
        for key in ("sharpness_random", "sharpness_worst"):
            assert r[key] == pytest.approx(other[key], rel=1e-4, abs=1e-7), (m, a, g, key)
    assert not any(f.endswith(".png") for f in os.listdir(os.path.join(out, "sharpness")))

    # a finished run in --run-dir: analysed, not re-trained
    code = main(["analyze-sharpness", "--run-dir", sharp_run, "--wise-ft-alphas", "1", "--samples", "1",
                 "--sparsity", "0.2", "--sharpness-batch-size", "16", "--no-plots"])
    assert code == 0
    rows = _read(os.path.join(sharp_run, "sharpness", "alphas.jsonl"))
    assert {r["method"] for r in rows} == {"ft", "flyp"} and {r["alpha"] for r in rows} == {1.0}


def test_explicit_checkpoints_on_image_folders(sharp_run, tmp_path):
    """Real-data flags: --eval-data image folders (class names from the ID folder), a zero-shot
    folder, a templates file; a contrastive (flyp) checkpoint, so any class count works."""
    from PIL import Image

    gen = torch.Generator().manual_seed(0)

    def folder(root, classes, n=4):
        for c in classes:
            os.makedirs(root / c)
            for i in range(n):
                arr = (torch.rand(20, 20, 3, generator=gen) * 255).to(torch.uint8).numpy()
                Image.fromarray(arr).save(root / c / f"{i}.png")
        return str(root)

    val = folder(tmp_path / "val", ["zero", "one", "two"])
    shift = folder(tmp_path / "shift", ["zero", "one", "two"], n=3)
    zs_task = folder(tmp_path / "task", ["seven", "eight"], n=3)
    templates = tmp_path / "templates.txt"
    templates.write_text("a photo of the digit {}.\nthe number {}.\n")
    ck = os.path.join(sharp_run, "checkpoints")
    out = str(tmp_path / "out")
    code = main(["analyze-sharpness", "--zeroshot", os.path.join(ck, "pretrain", "final.pt"),
                 "--finetuned", os.path.join(ck, "flyp", "final.pt"), "--eval-data", f"val={val}",
                 "--eval-data", f"shift={shift}", "--zeroshot-data", f"task={zs_task}",
                 "--templates", str(templates), "--wise-ft-alphas", "0,1", "--samples", "1",
                 "--sparsity", "0.3", "--run-dir", out, "--threads", "1"])
    assert code == 0
    rows = _read(os.path.join(out, "sharpness", "alphas.jsonl"))
    assert [r["method"] for r in rows] == ["flyp", "flyp"]
    for r in rows:
        assert {"top1_val", "top1_shift", "top1_task"} <= set(r)
        assert all(math.isfinite(r[k]) for k in ("overall_random", "overall_worst", "id_top1", "ood_mean",
                                                  "zeroshot_mean"))
    assert os.path.exists(os.path.join(out, "sharpness", "flyp_layer_sharpness.png"))
    # ft's head has the embedded model's 5 classes: a 3-class ID set is a clear error
    with pytest.raises(SystemExit) as e:
        main(["analyze-sharpness", "--zeroshot", os.path.join(ck, "pretrain", "final.pt"),
              "--finetuned", os.path.join(ck, "ft", "final.pt"), "--eval-data", f"val={val}",
              "--run-dir", str(tmp_path / "out2")])
    assert e.value.code == 2


def _bad(argv, capsys, *needles):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    for needle in needles:
        assert needle in err, (needle, err)


def test_bad_input_is_a_clear_error_before_any_work(tmp_path, capsys, sharp_run):
    ck = os.path.join(sharp_run, "checkpoints")
    zs, ft = os.path.join(ck, "pretrain", "final.pt"), os.path.join(ck, "ft", "final.pt")
    sub = ["analyze-sharpness", "--run-dir", str(tmp_path / "r")]
    both = ["--zeroshot", zs, "--finetuned", ft, "--embedded-fraction", "0.3"]
    _bad(sub + ["--rho", "0"], capsys, "--sharpness-rho")
    _bad(sub + ["--rho", "-0.1"], capsys, "--rho")
    _bad(sub + ["--rho", "nan"], capsys, "--rho")
    _bad(sub + ["--samples", "0"], capsys, "--sharpness-samples")
    _bad(sub + ["--sparsity", "1"], capsys, "--sharpness-sparsity", "[0, 1)")
    _bad(sub + ["--sparsity", "-0.2"], capsys, "--sharpness-sparsity")
    _bad(sub + ["--sparsity", "half"], capsys, "--sharpness-sparsity")
    _bad(sub + ["--sharpness-stragglers", "top3"], capsys, "--sharpness-stragglers")
    _bad(sub + ["--sharpness-batch-size", "0"], capsys, "--sharpness-batch-size")
    _bad(sub + ["--wise-ft-alphas", "0,2"], capsys, "--wise-ft-alphas")
    _bad(sub + ["--zeroshot", zs], capsys, "--zeroshot and --finetuned")
    _bad(sub + ["--zeroshot", str(tmp_path / "missing.pt"), "--finetuned", ft], capsys, "--zeroshot", "missing.pt")
    _bad(sub + ["--zeroshot", zs, "--finetuned", str(tmp_path / "nope.pt")], capsys, "--finetuned", "nope.pt")
    _bad(sub + ["--eval-data", f"val={tmp_path}"], capsys, "--eval-data")
    _bad(sub + both + ["--eval-data", f"val={tmp_path / 'absent'}"], capsys, "--eval-data", "absent")
    text = tmp_path / "text.pt"
    text.write_text("not a checkpoint")
    _bad(sub + ["--zeroshot", str(text), "--finetuned", ft, "--embedded-fraction", "0.3"], capsys,
         "--zeroshot", "text.pt", "not a readable torch checkpoint")
    state = checkpoint.load(ft, advice="")["model"]
    state["clip.visual.proj"] = state["clip.visual.proj"][:, :32].clone()
    misfit = str(tmp_path / "misfit.pt")
    torch.save(state, misfit)
    _bad(sub + ["--zeroshot", zs, "--finetuned", misfit, "--embedded-fraction", "0.3"], capsys,
         "--finetuned", "misfit.pt", "do not fit")
    _bad(sub + ["--zeroshot", ft, "--finetuned", ft, "--embedded-fraction", "0.3"], capsys,
         "--zeroshot", "head")
    assert not os.path.exists(tmp_path / "r" / "sharpness")
    # the training flags
    _bad(["--analyze-sharpness", "--sharpness-rho", "0", "--run-dir", str(tmp_path / "t")], capsys, "--sharpness-rho")
    _bad(["--sharpness-sparsity", "1.0", "--run-dir", str(tmp_path / "t")], capsys, "--sharpness-sparsity")
    assert not os.path.exists(tmp_path / "t")


def test_subcommand_help_lists_its_flags(capsys):
    with pytest.raises(SystemExit) as e:
        main(["analyze-sharpness", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--zeroshot", "--finetuned", "--eval-data", "--rho", "--samples", "--sparsity",
                 "--sharpness-stragglers", "--sharpness-measure", "--run-dir"):
        assert flag in out, flag
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "--analyze-sharpness" in capsys.readouterr().out
