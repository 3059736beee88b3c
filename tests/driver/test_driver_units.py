"""robustft-train's pieces against direct formulas: metrics (docs/maths.md, section 8; RSA of
section 4), WiSE-FT interpolation, method parsing, the schedule, batches across processes, atomic
checkpoints, the t-intervals and the claim verdicts of the study."""
from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("open_clip", exc_type=ImportError)  # robustft_train imports it

from robustft_train import checkpoint, evaluate, wise_ft
from robustft_train.errors import ConfigError
from robustft_train.data import epoch_batches
from robustft_train.methods import parse_method, parse_methods
from robustft_train.train import lr_at


def _unit(n, d, seed=0):
    return F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=1)


def test_ece_against_a_direct_binning():
    logits = torch.randn(500, 7, generator=torch.Generator().manual_seed(1)) * 3
    labels = torch.randint(0, 7, (500,), generator=torch.Generator().manual_seed(2))
    p = logits.softmax(-1)
    conf, pred = p.max(-1)
    ece = 0.0
    for b in range(15):
        lo, hi = b / 15, (b + 1) / 15
        idx = [i for i in range(500) if lo < conf[i] <= hi]
        if idx:
            acc = sum(int(pred[i] == labels[i]) for i in idx) / len(idx)
            ece += len(idx) / 500 * abs(acc - sum(conf[i].item() for i in idx) / len(idx))
    assert evaluate.expected_calibration_error(logits, labels) == pytest.approx(ece, abs=1e-6)
    perfect = torch.full((10, 3), -1e4)
    perfect[torch.arange(10), torch.arange(10) % 3] = 1e4
    assert evaluate.expected_calibration_error(perfect, torch.arange(10) % 3) == pytest.approx(0.0, abs=1e-6)


def test_alignment_and_uniformity_against_loops():
    img, txt = _unit(9, 5, 1), _unit(9, 5, 2)
    assert evaluate.alignment(img, txt) == pytest.approx(
        sum(((img[i] - txt[i]) ** 2).sum().item() for i in range(9)) / 9, rel=1e-6)
    x = torch.cat([img, txt]).double()
    vals = [math.exp(-2 * ((x[i] - x[j]) ** 2).sum().item()) for i in range(18) for j in range(i + 1, 18)]
    assert evaluate.uniformity(img, txt) == pytest.approx(math.log(sum(vals) / len(vals)), rel=1e-9)


def test_rsa_is_one_for_rotations_and_lower_for_noise():
    x = _unit(30, 8)
    q, _ = torch.linalg.qr(torch.randn(8, 8, generator=torch.Generator().manual_seed(3)))
    assert evaluate.rsa(x, x @ q) == pytest.approx(1.0, abs=1e-9)  # cosine geometry preserved
    noisy = F.normalize(x + 0.5 * _unit(30, 8, 9), dim=1)
    assert 0 < evaluate.rsa(x, noisy) < 0.99
    a, b = evaluate.rsa(x, noisy), evaluate.rsa(noisy, x)
    assert a == pytest.approx(b)


def test_retrieval_recall():
    img = torch.eye(4)
    txt = torch.eye(4)[[0, 1, 3, 2]]  # images 2 and 3 have their captions swapped
    r = evaluate.retrieval(img, txt, ks=(1, 2))
    assert r["i2t_r1"] == 0.5 and r["t2i_r1"] == 0.5 and r["i2t_r2"] == 1.0 and r["t2i_r2"] == 1.0


def test_wise_ft_interpolation():
    zs = {"w": torch.zeros(3), "n": torch.tensor(1), "h": torch.ones(2, dtype=torch.float64)}
    ft = {"w": torch.ones(3), "n": torch.tensor(5), "h": torch.full((2,), 3.0, dtype=torch.float64)}
    assert torch.equal(wise_ft.interpolate(zs, ft, 0.0)["w"], zs["w"])
    assert torch.equal(wise_ft.interpolate(zs, ft, 1.0)["w"], ft["w"])
    mid = wise_ft.interpolate(zs, ft, 0.25)
    assert torch.allclose(mid["w"], torch.full((3,), 0.25)) and mid["n"].item() == 5
    assert mid["h"].dtype == torch.float64 and torch.allclose(mid["h"], torch.full((2,), 1.5, dtype=torch.float64))
    with pytest.raises(ValueError, match="differ in keys"):
        wise_ft.interpolate({"a": torch.zeros(1)}, {"b": torch.zeros(1)}, 0.5)
    rows = [(0.0, [{"eval_set": "val", "top1": 0.5}]), (0.5, [{"eval_set": "val", "top1": 0.9}]),
            (1.0, [{"eval_set": "val", "top1": 0.9}])]
    assert wise_ft.best_alpha(rows, "val") == 1.0


@pytest.mark.parametrize("spec,canonical,base,regs", [
    ("ft", "ft", "ft", ()), ("flyp", "flyp", "flyp", ()), ("m2mix", "flyp+m2mix", "flyp", ("m2mix",)),
    ("dive", "flyp+dive", "flyp", ("dive",)), ("lipsum", "ft+lipsum", "ft", ("lipsum",)),
    ("flyp+lipsum", "flyp+lipsum", "flyp", ("lipsum",)),
    ("dive+m2mix+flyp", "flyp+m2mix+dive", "flyp", ("m2mix", "dive")),
    ("m2mix+lipsum", "flyp+m2mix+lipsum", "flyp", ("m2mix", "lipsum")),
    ("zeroshot", "zeroshot", None, ()),
])
def test_method_grammar(spec, canonical, base, regs):
    m = parse_method(spec)
    assert (m.spec, m.base, m.regularisers) == (canonical, base, regs)


def test_method_errors():
    for bad in ("", "ft+m2mix", "ft+dive", "ft+flyp", "zeroshot+ft", "flyp+flyp", "sgd"):
        with pytest.raises(ConfigError):
            parse_methods(bad)


def test_lr_schedule():
    assert lr_at(0, 100, 10, 1.0) == pytest.approx(0.1)
    assert lr_at(9, 100, 10, 1.0) == pytest.approx(1.0)
    assert lr_at(10, 100, 10, 1.0) == pytest.approx(1.0)
    assert lr_at(55, 100, 10, 1.0) == pytest.approx(0.5)
    assert lr_at(99, 100, 0, 1.0) > 0 and lr_at(100, 100, 0, 1.0) == pytest.approx(0.0, abs=1e-12)


def test_batches_across_processes_cover_the_single_process_batches():
    one = epoch_batches(50, 8, epoch=3, seed=1, rank=0, world=1)
    two = [epoch_batches(50, 4, epoch=3, seed=1, rank=r, world=2) for r in range(2)]
    assert len(one) == len(two[0]) == len(two[1]) == 6  # 50 // 8, the last incomplete batch dropped
    for k, batch in enumerate(one):
        assert sorted(batch) == sorted(two[0][k] + two[1][k])
    assert epoch_batches(50, 8, 4, 1, 0, 1) != one  # a new order each epoch


def test_atomic_save_never_leaves_a_partial_file(tmp_path):
    path = str(tmp_path / "ck" / "last.pt")
    checkpoint.atomic_save({"x": torch.arange(3)}, path)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("crash while writing")

    with pytest.raises(RuntimeError, match="crash while writing"):
        checkpoint.atomic_save({"x": torch.arange(5), "bad": Unpicklable()}, path)
    assert torch.equal(checkpoint.load(path, advice="")["x"], torch.arange(3))  # the old checkpoint is intact
    assert os.listdir(tmp_path / "ck") == ["last.pt"]  # no temporary file left behind


def test_model_names_and_configs(tmp_path):
    import json

    from robustft_train.errors import DriverError
    from robustft_train.models import EMBEDDED_MODEL_CONFIG, resolve_model_name

    assert resolve_model_name("ViT-B-32", str(tmp_path)) == "ViT-B-32"  # a built-in name (not built here)
    assert resolve_model_name("ViT-B/32", str(tmp_path)) == "ViT-B-32"
    path = tmp_path / "my-tiny.json"
    path.write_text(json.dumps({"model_cfg": EMBEDDED_MODEL_CONFIG}))  # open_clip_config.json layout
    assert resolve_model_name(str(path), str(tmp_path / "reg")) == "my-tiny"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"embed_dim": 8}))
    with pytest.raises(DriverError, match="missing"):
        resolve_model_name(str(bad), str(tmp_path / "reg"))
    with pytest.raises(DriverError, match="did you mean"):
        resolve_model_name("ViT-B-31", str(tmp_path))


def test_embedded_images_follow_the_model_input_size():
    from robustft_train import embedded

    _, train, evals, _ = embedded.build(0.1, model_size=48)
    assert train.dataset.image(0).shape == (3, 48, 48)
    assert all(e.dataset.image(0).shape == (3, 48, 48) for e in evals)
    _, train32, _, _ = embedded.build(0.1)
    assert train32.dataset.image(0).shape == (3, 32, 32)
    assert {e.role for e in evals} == {"id", "ood", "zeroshot"}
    assert [e.name for e in evals] == ["val", "test", "rotate", "invert", "noise", "blur", "digits5-9"]


def test_t_interval_and_paired_differences_against_scipy():
    from scipy import stats as sps

    from robustft_train.stats import direction, paired, t_interval

    xs = [71.2, 74.8, 69.9, 73.3]
    st = t_interval(xs)
    lo, hi = sps.t.interval(0.95, len(xs) - 1, loc=sum(xs) / len(xs), scale=sps.sem(xs))
    assert st["n_seeds"] == 4 and st["mean"] == pytest.approx(sum(xs) / 4)
    assert (st["ci_low"], st["ci_high"]) == pytest.approx((lo, hi), rel=1e-12)
    assert t_interval([3.0])["ci_low"] is None and t_interval([None, 2.0, float("nan")])["n_seeds"] == 1
    d = paired([5.0, 6.0, 7.0, None], [4.0, 4.5, 6.5, 1.0])  # the last seed is missing on one side
    assert d["n_seeds"] == 3 and d["mean"] == pytest.approx(1.0)
    assert direction(d) == "inconclusive"  # diffs 1, 1.5, 0.5: interval [-0.24, 2.24]
    assert direction(paired([5.0, 6.0, 7.0], [4.0, 5.1, 5.9])) == "higher"
    assert direction(paired([4.0, 5.1, 5.9], [5.0, 6.0, 7.0])) == "lower"


def _tables(method_values: dict[str, list[dict]], curves=None, correlations=None):
    from robustft_train.claims import SeedTables

    n = len(next(iter(method_values.values())))
    return SeedTables(list(range(n)), method_values, curves or {}, correlations or {}, ["test"], "val")


def test_claim_verdicts():
    from robustft_train.claims import evaluate_claims

    def seeds(**per_key):  # per metric the values of 3 seeds
        return [{k: v[i] for k, v in per_key.items()} for i in range(3)]

    flyp = seeds(alignment_test=[0.60, 0.62, 0.61], uniformity_test=[-1.9, -1.8, -1.85], r1_test=[5.0, 5.2, 4.8],
                 rsa_val=[0.84, 0.85, 0.83], zeroshot_mean_top1=[73.0, 74.0, 72.0], ood_mean_top1=[53.0, 54.0, 52.0],
                 id_mean_top1=[93.0, 94.0, 92.0])
    values = {
        "flyp": flyp,
        # better alignment (clearly), worse uniformity (clearly), R@1 noise around zero
        "flyp+m2mix": seeds(alignment_test=[0.30, 0.33, 0.31], uniformity_test=[-1.6, -1.5, -1.55],
                            r1_test=[5.5, 4.9, 4.9]),
        # everything better, ID within 2 points
        "flyp+dive": seeds(rsa_val=[0.97, 0.98, 0.97], zeroshot_mean_top1=[80.0, 81.5, 79.0],
                           ood_mean_top1=[54.0, 55.0, 53.2], id_mean_top1=[92.5, 93.6, 91.4]),
        # ID 5 points lower: not comparable
        "ft": seeds(zeroshot_mean_top1=[72.0, 73.0, 71.0], ood_mean_top1=[55.0, 55.0, 55.0],
                    id_mean_top1=[96.0, 96.0, 96.0]),
        "ft+lipsum": seeds(zeroshot_mean_top1=[83.0, 84.0, 82.0], ood_mean_top1=[54.0, 53.5, 54.2],
                           id_mean_top1=[91.0, 90.8, 91.2]),
    }
    rows = evaluate_claims(_tables(values))
    verdict = {(r["claim"][0], r["part"]): r["verdict"] for r in rows}
    claim = {r["claim"][0]: r["claim_verdict"] for r in rows}
    assert verdict[("1", "alignment (lower is better)")] == "holds"
    assert verdict[("1", "uniformity (lower is better)")] == "does not hold"
    assert verdict[("1", "retrieval R@1")] == "inconclusive"
    assert claim["1"] == "does not hold"  # one part does not hold
    assert all(verdict[("2", p)] == "holds" for p in ("keeps the geometry (RSA)", "zero-shot accuracy",
                                                       "OOD accuracy", "comparable ID accuracy"))
    assert claim["2"] == "holds"
    assert verdict[("3", "zero-shot accuracy")] == "holds" and verdict[("3", "OOD accuracy")] == "does not hold"
    assert verdict[("3", "comparable ID accuracy")] == "does not hold"  # 5 points lower, tightly
    # WiSE-FT and stragglers were not measured here: inconclusive, never a verdict from nothing
    assert claim["4"] == "inconclusive" and claim["5"] == "inconclusive"
    by_part = {r["part"]: r for r in rows if r["claim"].startswith("2")}
    r = by_part["zero-shot accuracy"]
    assert r["mean_diff"] == pytest.approx(80.1666666 - 73.0, rel=1e-6) and r["n_seeds"] == 3


def test_wise_ft_and_straggler_claims_read_curves_and_correlations():
    from robustft_train.claims import evaluate_claims

    curve = {0.0: {"ood_mean_top1": 50.0}, 0.5: {"ood_mean_top1": 56.0}, 1.0: {"ood_mean_top1": 54.0}}
    shifted = [{a: {"ood_mean_top1": v["ood_mean_top1"] + d} for a, v in curve.items()} for d in (0.5, -0.3)]
    curves = {"ft": [curve] + shifted}
    corr = {"flyp": [{"straggler_random": 0.9, "overall_random": -0.2}, {"straggler_random": -0.8,
                                                                          "overall_random": 0.3},
                     {"straggler_random": 0.95, "overall_random": 0.1}]}
    rows = evaluate_claims(_tables({"ft": [{}] * 3}, curves, corr))
    wise = next(r for r in rows if r["part"].startswith("ft: alpha"))
    assert wise["mean_diff"] == pytest.approx(2.0) and wise["verdict"] == "holds"  # 56 vs max(50, 54)
    strag = next(r for r in rows if r["part"].startswith("flyp: abs(rho)"))
    assert strag["mean_diff"] == pytest.approx((0.7 + 0.5 + 0.85) / 3) and strag["verdict"] == "holds"
