"""robustft-train's pieces against direct formulas: metrics (docs/maths.md, section 8, RSA of
section 4), WiSE-FT interpolation, method parsing, the schedule, batches across processes, atomic
checkpoints."""
from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as F

from robustft_train import checkpoint, evaluate, wise_ft
from robustft_train.config import ConfigError
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


def test_method_errors_and_availability(monkeypatch):
    import robustft_ext

    for bad in ("", "ft+m2mix", "ft+dive", "ft+flyp", "zeroshot+ft", "flyp+flyp", "sgd"):
        with pytest.raises(ConfigError):
            parse_methods(bad)
    monkeypatch.delattr(robustft_ext, "DiVELoss", raising=False)
    reason = parse_method("flyp+dive").unavailable_reason()
    assert reason == "unavailable: robustft_ext has no DiVELoss yet (needed by dive)"
    assert parse_method("ft").unavailable_reason() is None
    monkeypatch.setattr(robustft_ext, "DiVELoss", object, raising=False)
    assert parse_method("dive").unavailable_reason() is None


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
    assert torch.equal(checkpoint.load(path)["x"], torch.arange(3))  # the old checkpoint is intact
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
