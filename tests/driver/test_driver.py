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

pytest.importorskip("open_clip", exc_type=ImportError)  # robustft_train imports it

from robustft_train import checkpoint
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
    trained = [m for m in dict.fromkeys(r["method"] for r in rows) if m != "zeroshot"]
    assert trained == ["ft", "flyp", "flyp+m2mix", "flyp+dive", "ft+lipsum"]
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


def test_embedded_default_csvs_hold_the_console_units(embedded_run, capsys):
    """results.csv holds percentages in *_pct columns (results.jsonl fractions); summary.csv is the
    printed table, in its units."""
    rows = _rows(embedded_run)
    with open(os.path.join(embedded_run, "results.csv")) as f:
        table = list(csv.DictReader(f))
    assert "top1_pct" in table[0] and "top1" not in table[0]
    for r, j in zip(table, rows):
        assert float(r["top1_pct"]) == pytest.approx(100 * j["top1"])
    with open(os.path.join(embedded_run, "summary.csv")) as f:
        summary = {r["method"]: r for r in csv.DictReader(f)}
    val = next(r["top1"] for r in rows if r["method"] == "zeroshot" and r["eval_set"] == "val")
    assert float(summary["zeroshot"]["val"]) == pytest.approx(100 * val)
    assert 0.0 < float(summary["ft"]["rsa_val"]) <= 1.0 + 1e-9  # RSA as is
    assert "test_R@1" in summary["flyp"]  # retrieval on the captioned held-out images


def test_each_method_for_a_few_steps(tmp_path):
    run_dir = str(tmp_path / "run")
    code = main(TINY + ["--run-dir", run_dir, "--methods", "ft,flyp,m2mix,flyp+m2mix+dive,lipsum,flyp+lipsum",
                        "--dive-ref-batch-size", "8"])
    assert code == 0
    terms = {"ft": ["ce"], "flyp": ["clip"], "flyp+m2mix": ["clip", "m2mix"],
             "flyp+m2mix+dive": ["clip", "m2mix", "dive"], "ft+lipsum": ["ce", "lipsum"],
             "flyp+lipsum": ["clip", "lipsum"]}
    assert {r["method"] for r in _rows(run_dir)} == set(terms)
    for method, names in terms.items():
        log = _log(run_dir, method)
        assert log
        for r in log:
            assert all(math.isfinite(r[f"loss_{t}"]) and r[f"loss_{t}"] >= 0 for t in names), r
            assert r["loss"] == pytest.approx(sum(r[f"loss_{t}"] for t in names))
        if "dive" in names:  # DiVE's centre (an EMA of difference vectors) is saved with the weights
            final = _final(os.path.join(run_dir, "checkpoints", method, "final.pt"))
            center = final["method_state"]["dive"]["center"]
            assert center.shape == (64,) and torch.isfinite(center).all() and center.abs().sum() > 0


def test_precision_and_gradient_accumulation(tmp_path):
    run_dir = str(tmp_path / "run")
    assert main(TINY + ["--run-dir", run_dir, "--methods", "flyp", "--precision", "bf16",
                        "--accum-steps", "2", "--batch-size", "8"]) == 0
    from robustft_train import embedded

    log = _log(run_dir, "flyp")
    assert log and all(math.isfinite(r["loss"]) for r in log)
    n_train = len(embedded.build(0.3)[1].dataset)
    assert [r["step"] for r in log] == list(range(1, (n_train // 8) // 2 + 1))  # optimiser steps


def _final(path) -> dict:
    return checkpoint.load(path, advice="")


def _state(path) -> dict:
    return _final(path)["model"]


def test_resume_after_interruption_equals_uninterrupted(tmp_path):
    # with m^2-mix (a lam per step) and DiVE (reference pairs per step, a centre)
    method = "flyp+m2mix+dive"
    args = ["--embedded-fraction", "0.3", "--pretrain-epochs", "2", "--epochs", "2", "--methods", method,
            "--dive-ref-batch-size", "8", "--wise-ft-alphas", "0,1", "--no-plots"]
    straight = str(tmp_path / "straight")
    assert main(args + ["--run-dir", straight]) == 0
    broken = str(tmp_path / "broken")
    # pre-training has 6 steps, fine-tuning 4: stop inside pre-training, then inside fine-tuning
    assert main(args + ["--run-dir", broken, "--stop-after-steps", "4"]) == EXIT_STOPPED
    assert os.path.exists(os.path.join(broken, "checkpoints", "pretrain", "last.pt"))
    assert not os.path.exists(os.path.join(broken, "checkpoints", "pretrain", "final.pt"))
    assert main(["--resume", "--run-dir", broken, "--stop-after-steps", "1"]) == EXIT_STOPPED
    assert os.path.exists(os.path.join(broken, "checkpoints", method, "last.pt"))
    assert main(["--resume", "--run-dir", broken]) == 0
    for phase in ("pretrain", method):
        a = _state(os.path.join(straight, "checkpoints", phase, "final.pt"))
        b = _state(os.path.join(broken, "checkpoints", phase, "final.pt"))
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), (phase, k)
        fa = _final(os.path.join(straight, "checkpoints", phase, "final.pt"))
        fb = _final(os.path.join(broken, "checkpoints", phase, "final.pt"))
        if "dive" in fa["method_state"]:
            assert torch.equal(fa["method_state"]["dive"]["center"], fb["method_state"]["dive"]["center"])
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
    from robustft_train.config import Config
    from robustft_train.flags import training_parser

    text = training_parser().format_help()
    flags = {f"--{f.name.replace('_', '-')}" for f in Config.__dataclass_fields__.values()} - {"--embedded"}
    missing = [f for f in flags if f not in text]
    assert not missing, missing
    done = subprocess.run([sys.executable, "-m", "robustft_train", "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "--wise-ft-alphas" in done.stdout
    exe = shutil.which("robustft-train")
    if exe is not None:  # the console script of an installed (editable) package
        done = subprocess.run([exe, "--help"], capture_output=True, text=True)
        assert done.returncode == 0 and "--methods" in done.stdout
