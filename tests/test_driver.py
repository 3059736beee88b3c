"""robustft-train end to end: the embedded default (reduced), every method for a few steps, the
DiVE / Lipsum plumbing, resume after an interruption, and the command line."""
from __future__ import annotations

import csv
import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch

import robustft_ext
from robustft_train.cli import main
from robustft_train.runner import EXIT_STOPPED

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# A reduced embedded default: half the digits, short pre-training and fine-tuning, 3 alphas.
SMALL = ["--embedded-fraction", "0.5", "--pretrain-epochs", "8", "--epochs", "8", "--lr", "1e-3",
         "--wise-ft-alphas", "0,0.5,1"]
TINY = ["--embedded-fraction", "0.3", "--pretrain-epochs", "1", "--epochs", "1", "--wise-ft-alphas", "1",
        "--no-plots"]


@pytest.fixture(autouse=True)
def _keep_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _rows(run_dir) -> list[dict]:
    with open(os.path.join(run_dir, "results.jsonl")) as f:
        return [json.loads(line) for line in f]


def _log(run_dir, phase) -> list[dict]:
    with open(os.path.join(run_dir, "logs", f"{phase}.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def embedded_run(tmp_path_factory):
    run_dir = str(tmp_path_factory.mktemp("embedded") / "run")
    n = torch.get_num_threads()
    code = main(SMALL + ["--run-dir", run_dir])
    torch.set_num_threads(n)
    assert code == 0
    return run_dir


def test_embedded_default_writes_the_run_folder(embedded_run):
    for name in ("config.json", "results.csv", "results.jsonl", "summary.csv", "training.json",
                 "wise_ft_id_vs_ood.png", "method_bars.png"):
        assert os.path.getsize(os.path.join(embedded_run, name)) > 0, name
    for png in ("wise_ft_id_vs_ood.png", "method_bars.png"):
        with open(os.path.join(embedded_run, png), "rb") as f:
            assert f.read(8) == PNG_MAGIC
    for phase in ("pretrain", "ft", "flyp"):
        assert os.path.exists(os.path.join(embedded_run, "checkpoints", phase, "final.pt")), phase
        assert not os.path.exists(os.path.join(embedded_run, "checkpoints", phase, "last.pt"))
    cfg = json.load(open(os.path.join(embedded_run, "config.json")))
    assert cfg["embedded"] and cfg["epochs"] == 8 and cfg["batch_size"] == 32  # resolved values
    with open(os.path.join(embedded_run, "results.csv")) as f:
        assert len(list(csv.DictReader(f))) == len(_rows(embedded_run))


def test_embedded_default_wise_ft_rows_are_finite(embedded_run):
    rows = _rows(embedded_run)
    sets = {"val", "test", "rotate", "invert", "noise", "blur", "digits5-9"}
    trained = ["ft", "flyp"] + (["flyp+m2mix"] if hasattr(robustft_ext, "M2MixLoss") else [])
    for method in trained:
        mrows = [r for r in rows if r["method"] == method]
        assert {r["alpha"] for r in mrows} == {0.0, 0.5, 1.0}
        assert {r["eval_set"] for r in mrows} == sets
        for r in mrows:
            for key in ("top1", "ece", "alignment", "uniformity", "rsa"):
                assert r[key] is not None and math.isfinite(r[key]), (method, r)
            assert 0 <= r["top1"] <= 1 and 0 <= r["ece"] <= 1 and -1 <= r["rsa"] <= 1 + 1e-9
        best = {r["alpha"] for r in mrows if r["best_alpha"]}
        assert len(best) == 1
        val = {r["alpha"]: r["top1"] for r in mrows if r["eval_set"] == "val"}
        assert val[best.pop()] == max(val.values())  # best alpha by ID validation accuracy
    # alpha 0 of ft is exactly the zero-shot model (zero-shot head, zero-shot weights)
    zs = {r["eval_set"]: r["top1"] for r in rows if r["method"] == "zeroshot"}
    ft0 = {r["eval_set"]: r["top1"] for r in rows if r["method"] == "ft" and r["alpha"] == 0.0}
    assert zs == pytest.approx(ft0, abs=1e-6)


def test_embedded_default_fine_tuning_raises_id_accuracy(embedded_run):
    rows = _rows(embedded_run)
    zs = next(r["top1"] for r in rows if r["method"] == "zeroshot" and r["eval_set"] == "val")
    for method in ("ft", "flyp"):
        ft = next(r["top1"] for r in rows if r["method"] == method and r["alpha"] == 1.0
                  and r["eval_set"] == "val")
        assert ft > zs + 0.05, (method, ft, zs)


def test_embedded_default_reports_unavailable_methods(embedded_run, capsys):
    rows = _rows(embedded_run)
    for method, attr in (("flyp+dive", "dive_loss"), ("ft+lipsum", "lipsum_loss"),
                         ("flyp+m2mix", "M2MixLoss")):
        mrows = [r for r in rows if r["method"] == method]
        if hasattr(robustft_ext, attr):
            assert mrows and all(r["status"] == "ok" for r in mrows)
        else:
            assert len(mrows) == 1 and mrows[0]["status"].startswith("unavailable")
            assert attr in mrows[0]["status"] and mrows[0].get("top1") is None
    summary = list(csv.DictReader(open(os.path.join(embedded_run, "summary.csv"))))
    assert {r["method"] for r in summary} >= {"zeroshot", "ft", "flyp", "flyp+dive", "ft+lipsum"}


def test_each_method_for_a_few_steps(tmp_path):
    run_dir = str(tmp_path / "run")
    code = main(TINY + ["--run-dir", run_dir, "--methods", "ft,flyp,m2mix,flyp+m2mix+dive,lipsum"])
    assert code == 0
    rows = _rows(run_dir)
    status = {r["method"]: r["status"] for r in rows}
    assert status["ft"] == "ok" and status["flyp"] == "ok"
    assert "dive_loss" in status["flyp+m2mix+dive"] and "lipsum_loss" in status["ft+lipsum"]
    for phase, term in (("ft", "loss_ce"), ("flyp", "loss_clip")):
        log = _log(run_dir, phase)
        assert log and all(math.isfinite(r[term]) and r["loss"] == pytest.approx(r[term]) for r in log)
    if hasattr(robustft_ext, "M2MixLoss"):
        log = _log(run_dir, "flyp+m2mix")
        assert all(math.isfinite(r["loss_m2mix"]) and r["loss_m2mix"] > 0 for r in log)
        assert all(r["loss"] == pytest.approx(r["loss_clip"] + r["loss_m2mix"]) for r in log)
    else:
        assert status["flyp+m2mix"].startswith("unavailable")


def test_precision_and_gradient_accumulation(tmp_path):
    run_dir = str(tmp_path / "run")
    assert main(TINY + ["--run-dir", run_dir, "--methods", "flyp", "--precision", "bf16",
                        "--accum-steps", "2", "--batch-size", "8"]) == 0
    from robustft_train import embedded

    log = _log(run_dir, "flyp")
    assert log and all(math.isfinite(r["loss"]) for r in log)
    n_train = len(embedded.build(0.3)[1].dataset)
    assert [r["step"] for r in log] == list(range(1, (n_train // 8) // 2 + 1))  # optimiser steps


def _reference_dive_loss(image_ft, text_ft, image_pre, text_pre, center):
    """METHODS.md section 4, written here to exercise the driver's plumbing until the library's lands."""
    u, v = image_ft - image_pre, text_ft - text_pre
    avl = ((u - center).pow(2).sum(1) + (v - center).pow(2).sum(1)).mean()
    pvl = (u - v).pow(2).sum(1).mean()
    return avl, pvl


def _reference_lipsum_loss(image_ft, image_pre, random_text_features, logit_scale):
    """METHODS.md section 5."""
    v = logit_scale * (image_ft - image_pre) @ random_text_features.T
    return v.pow(2).sum() / (2 * v.numel())


def test_dive_and_lipsum_plumbing_once_their_losses_exist(tmp_path, monkeypatch):
    """With functions of the documented signatures present, the driver feeds them the frozen
    pre-trained features (reference pairs for DiVE, random texts for Lipsum) and keeps DiVE's centre."""
    calls = {"dive": 0, "lipsum": 0}

    def dive(*args):
        calls["dive"] += 1
        image_ft, text_ft, image_pre, text_pre, center = args
        assert image_ft.shape == image_pre.shape == text_ft.shape == (4, 64)
        assert not image_pre.requires_grad and image_ft.requires_grad
        return _reference_dive_loss(*args)

    def lipsum(*args):
        calls["lipsum"] += 1
        image_ft, image_pre, texts, scale = args
        assert texts.shape == (80, 64) and not texts.requires_grad and isinstance(scale, float)
        return _reference_lipsum_loss(*args)

    monkeypatch.setattr(robustft_ext, "dive_loss", dive, raising=False)
    monkeypatch.setattr(robustft_ext, "lipsum_loss", lipsum, raising=False)
    run_dir = str(tmp_path / "run")
    assert main(TINY + ["--run-dir", run_dir, "--methods", "dive,lipsum", "--dive-ref-batch-size", "4",
                        "--dive-lambda", "10"]) == 0
    assert calls["dive"] > 0 and calls["lipsum"] > 0
    status = {r["method"]: r["status"] for r in _rows(run_dir)}
    assert status == {"flyp+dive": "ok", "ft+lipsum": "ok"}
    final = torch.load(os.path.join(run_dir, "checkpoints", "flyp+dive", "final.pt"), weights_only=False)
    center = final["method_state"]["center"]
    assert center.shape == (64,) and torch.isfinite(center).all() and center.abs().sum() > 0
    assert all(r["loss_dive"] >= 0 for r in _log(run_dir, "flyp+dive"))
    assert all(r["loss_lipsum"] >= 0 for r in _log(run_dir, "ft+lipsum"))


def test_only_unavailable_methods_exit_non_zero(tmp_path, capsys, monkeypatch):
    monkeypatch.delattr(robustft_ext, "dive_loss", raising=False)
    monkeypatch.delattr(robustft_ext, "lipsum_loss", raising=False)
    with pytest.raises(SystemExit) as e:
        main(["--run-dir", str(tmp_path / "run"), "--methods", "dive,lipsum"])
    assert e.value.code != 0
    err = capsys.readouterr().err
    assert "none of the requested methods can run" in err and "dive_loss" in err and "lipsum_loss" in err


def _state(path) -> dict:
    return torch.load(path, weights_only=False)["model"]


def test_resume_after_interruption_equals_uninterrupted(tmp_path):
    args = ["--embedded-fraction", "0.3", "--pretrain-epochs", "2", "--epochs", "2", "--methods", "flyp",
            "--wise-ft-alphas", "0,1", "--no-plots"]
    straight = str(tmp_path / "straight")
    assert main(args + ["--run-dir", straight]) == 0
    broken = str(tmp_path / "broken")
    # pre-training has 6 steps, fine-tuning 4: stop inside pre-training, then inside fine-tuning
    assert main(args + ["--run-dir", broken, "--stop-after-steps", "4"]) == EXIT_STOPPED
    assert os.path.exists(os.path.join(broken, "checkpoints", "pretrain", "last.pt"))
    assert not os.path.exists(os.path.join(broken, "checkpoints", "pretrain", "final.pt"))
    assert main(["--resume", "--run-dir", broken, "--stop-after-steps", "1"]) == EXIT_STOPPED
    assert os.path.exists(os.path.join(broken, "checkpoints", "flyp", "last.pt"))
    assert main(["--resume", "--run-dir", broken]) == 0
    for phase in ("pretrain", "flyp"):
        a = _state(os.path.join(straight, "checkpoints", phase, "final.pt"))
        b = _state(os.path.join(broken, "checkpoints", phase, "final.pt"))
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), (phase, k)
        for key in ("step", "lr", "loss"):  # the logged history is continued, not restarted
            assert [r[key] for r in _log(straight, phase)] == [r[key] for r in _log(broken, phase)]
    assert _rows(straight) == _rows(broken)


def test_run_dir_is_not_overwritten_without_resume(tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.json").write_text("{}")
    with pytest.raises(SystemExit) as e:
        main(TINY + ["--run-dir", str(run_dir)])
    assert e.value.code == 2 and "--resume" in capsys.readouterr().err


def test_help_documents_every_flag():
    from robustft_train.config import Config, build_parser

    text = build_parser().format_help()
    flags = {f"--{f.name.replace('_', '-')}" for f in Config.__dataclass_fields__.values()} - {"--embedded"}
    missing = [f for f in flags if f not in text]
    assert not missing, missing
    done = subprocess.run([sys.executable, "-m", "robustft_train", "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "--wise-ft-alphas" in done.stdout
    exe = shutil.which("robustft-train")
    if exe is not None:  # the console script of an installed (editable) package
        done = subprocess.run([exe, "--help"], capture_output=True, text=True)
        assert done.returncode == 0 and "--methods" in done.stdout
