"""robustft-train study: the method comparison over seeds (tiny settings, 2 seeds): each seed a
complete run, the summary's means and intervals from the seeds' own results, paired differences,
the claims table with verdicts, plots, resume, bad input."""
from __future__ import annotations

import csv
import json
import os

import pytest
import torch

pytest.importorskip("open_clip", exc_type=ImportError)  # robustft_train imports it

from robustft_train.cli import main
from robustft_train.stats import paired, t_interval

TINY = ["--embedded-fraction", "0.3", "--pretrain-epochs", "2", "--epochs", "2", "--wise-ft-alphas", "0,0.5,1",
        "--sharpness-samples", "1", "--sharpness-batch-size", "16", "--metric-max-images", "100"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True)
def _keep_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    run_dir = str(tmp_path_factory.mktemp("study") / "s")
    n = torch.get_num_threads()
    assert main(["study", "--seeds", "3,4"] + TINY + ["--run-dir", run_dir]) == 0
    torch.set_num_threads(n)
    return run_dir


def _csv(path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def _rows(run_dir) -> list[dict]:
    with open(os.path.join(run_dir, "results.jsonl")) as f:
        return [json.loads(line) for line in f]


def _val_top1(rows, method, alpha=1.0):
    return next(100 * r["top1"] for r in rows if r["method"] == method and r["alpha"] == alpha and r["eval_set"] == "val")


def test_every_seed_is_a_complete_run_with_its_own_seed(study):
    for seed in (3, 4):
        seed_dir = os.path.join(study, f"seed-{seed}")
        cfg = json.load(open(os.path.join(seed_dir, "config.json")))
        assert cfg["seed"] == seed and cfg["analyze_sharpness"] and cfg["sharpness_methods"] == "ft,flyp"
        for name in ("results.jsonl", "summary.csv", "sharpness/correlations.jsonl"):
            assert os.path.isfile(os.path.join(seed_dir, name)), name
    # the seed drives initialisation, data order, augmentation, ...: the runs differ
    a, b = (_rows(os.path.join(study, f"seed-{s}")) for s in (3, 4))
    assert [r.get("alignment") for r in a] != [r.get("alignment") for r in b]


def test_summary_and_differences_come_from_the_seeds(study):
    seeds = [_rows(os.path.join(study, f"seed-{s}")) for s in (3, 4)]
    summary = {(r["method"], r["metric"]): r for r in _csv(os.path.join(study, "study_summary.csv"))}
    for method in ("zeroshot", "ft", "flyp", "flyp+m2mix", "flyp+dive", "ft+lipsum"):
        alpha = 0.0 if method == "zeroshot" else 1.0
        expect = t_interval([_val_top1(rows, method, alpha) for rows in seeds])
        got = summary[(method, "top1_val")]
        assert got["unit"] == "%" and int(got["n_seeds"]) == 2
        for key in ("mean", "ci_low", "ci_high"):
            assert float(got[key]) == pytest.approx(expect[key], abs=1e-9)
        assert float(got["ci_low"]) <= float(got["mean"]) <= float(got["ci_high"])
    assert summary[("flyp", "rsa_val")]["unit"] == "" and ("flyp", "r1_test") in summary
    diffs = {(r["method"], r["metric"]): r for r in _csv(os.path.join(study, "study_differences.csv"))}
    d = diffs[("ft+lipsum", "zeroshot_mean_top1")]
    assert d["base"] == "ft" and d["unit"] == "% points"
    zs = [[100 * r["top1"] for r in rows if r["method"] == m and r["alpha"] == 1.0 and r["role"] == "zeroshot"][0]
          for rows in seeds for m in ("ft+lipsum", "ft")]
    assert float(d["mean_diff"]) == pytest.approx(paired(zs[0::2], zs[1::2])["mean"], abs=1e-9)
    assert d["direction"] in ("higher", "lower", "inconclusive")
    curves = _csv(os.path.join(study, "study_wise_ft.csv"))
    assert {float(r["alpha"]) for r in curves if r["method"] == "flyp"} == {0.0, 0.5, 1.0}


def test_claims_table_has_a_verdict_per_part(study, capsys):
    claims = _csv(os.path.join(study, "claims.csv"))
    assert {r["claim"][0] for r in claims} == {"1", "2", "3", "4", "5"}
    for r in claims:
        assert r["verdict"] in ("holds", "does not hold", "inconclusive")
        assert r["claim_verdict"] in ("holds", "does not hold", "inconclusive")
        assert int(r["n_seeds"]) <= 2
    markdown = open(os.path.join(study, "claims.md")).read()
    assert markdown.count("\n| ") == len(claims) + 2  # header, rule, one line per part
    for png in ("study_bars.png", "study_wise_ft.png", "study_differences.png"):
        with open(os.path.join(study, png), "rb") as f:
            assert f.read(8) == PNG_MAGIC


def test_resume_of_a_finished_study_only_summarises_again(study, capsys):
    before = os.stat(os.path.join(study, "seed-3", "results.jsonl")).st_mtime_ns
    assert main(["study", "--resume", "--run-dir", study]) == 0
    out = capsys.readouterr().out
    assert "seed 3: finished earlier" in out and "seed 4: finished earlier" in out
    assert "claims.csv" in out and "files written" in out
    assert os.stat(os.path.join(study, "seed-3", "results.jsonl")).st_mtime_ns == before


@pytest.mark.parametrize("args,message", [
    (["--seeds", "1,x"], "--seeds: expected comma-separated integers"),
    (["--seeds", "1,1"], "--seeds: give distinct seeds"),
    (["--lr", "-1"], "--lr must be a positive number"),
    (["--resume"], "study.json does not exist"),
])
def test_bad_study_input(tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as e:
        main(["study", "--run-dir", str(tmp_path / "s")] + args)
    assert e.value.code == 2 and message in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "s" / "seed-1")


def test_a_study_folder_is_not_overwritten(study, capsys):
    with pytest.raises(SystemExit) as e:
        main(["study", "--seeds", "3"] + TINY + ["--run-dir", study])
    assert e.value.code == 2 and "already holds a study" in capsys.readouterr().err
