"""robustft-train under faults a hostile user or a crash produces: images that fail to decode only at
training time, damaged checkpoints and run files, temporary files of an interrupted write, and
checkpoints that would need unpickling arbitrary objects. Each gives a clear outcome: skipped
and counted, or exit status 2 with a message naming the file and what to do."""
from __future__ import annotations

import io
import json
import os
import random
import shutil
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("open_clip", exc_type=ImportError)  # robustft_train imports it

from robustft_train import checkpoint, files
from robustft_train.cli import main
from robustft_train.errors import EXIT_DIVERGED, CheckpointError, excerpt
from robustft_train.models import EMBEDDED_MODEL_CONFIG
from robustft_train.runner import EXIT_STOPPED

CLASSES = {"red_thing": (220, 30, 30), "green_thing": (30, 200, 40), "blue_thing": (30, 40, 220)}
FAST = ["--epochs", "1", "--batch-size", "8", "--lr", "1e-3", "--warmup-steps", "1", "--wise-ft-alphas", "1",
        "--no-plots", "--threads", "1"]
# pre-training finishes (3 steps), ft stops at its 4th of 6 steps: pretrain/final.pt and ft/last.pt
STOPPED = ["--embedded-fraction", "0.3", "--pretrain-epochs", "1", "--epochs", "3", "--methods", "ft",
           "--wise-ft-alphas", "1", "--no-plots", "--stop-after-steps", "4"]


@pytest.fixture(autouse=True)
def _keep_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _truncated_jpeg(path) -> None:
    """A JPEG cut short: PIL's verify() accepts it, decoding it fails ("image file is truncated")."""
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray((rng.random((32, 32, 3)) * 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
    data = buf.getvalue()
    path.write_bytes(data[: int(0.6 * len(data))])
    with Image.open(path) as img:
        img.verify()  # passes the scan
    with pytest.raises(OSError), Image.open(path) as img:
        img.convert("RGB")


def _folder(root, n, seed) -> str:
    for k, (name, rgb) in enumerate(CLASSES.items()):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            arr = np.clip(np.array(rgb)[None, None] + np.random.default_rng(seed + 10 * k + i).normal(0, 25, (32, 32, 3)),
                          0, 255).astype(np.uint8)
            Image.fromarray(arr).save(root / name / f"{i}.png")
    return str(root)


def test_an_image_that_fails_to_decode_during_training_is_skipped_and_counted(tmp_path, capsys):
    train = _folder(tmp_path / "train", 8, 0)
    evals = _folder(tmp_path / "id", 3, 100)
    _truncated_jpeg(tmp_path / "train" / "red_thing" / "truncated.jpg")
    _truncated_jpeg(tmp_path / "id" / "blue_thing" / "truncated.jpg")
    (tmp_path / "model.json").write_text(json.dumps(EMBEDDED_MODEL_CONFIG))
    run_dir = str(tmp_path / "run")
    # batch 5: the 25 training images make 5 whole batches, so every image is drawn each epoch
    code = main(FAST + ["--batch-size", "5", "--model", str(tmp_path / "model.json"), "--train-data", train,
                        "--eval-data", f"id={evals}", "--methods", "ft,flyp", "--run-dir", run_dir])
    assert code == 0
    out = capsys.readouterr().out
    # the evaluation set is decoded in full when it is loaded: skipped there, with its count
    assert "--eval-data id: skipped 1 unreadable image(s) of 10" in out
    # the training set is only verified when loaded: the truncated JPEG is met while training
    assert "skipped 1 training image(s) that failed to decode" in out and "truncated.jpg" in out
    phases = json.load(open(os.path.join(run_dir, "training.json")))["phases"]
    assert phases["ft"]["skipped_images"] == 1 and phases["flyp"]["skipped_images"] == 1
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "results.jsonl"))]
    assert all(r["n"] == 9 for r in rows)


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory):
    """An interrupted run: pretrain/final.pt, ft/last.pt."""
    run_dir = str(tmp_path_factory.mktemp("stopped") / "run")
    n = torch.get_num_threads()
    assert main(STOPPED + ["--run-dir", run_dir]) == EXIT_STOPPED
    torch.set_num_threads(n)
    for name in ("pretrain/final.pt", "ft/last.pt"):
        assert os.path.isfile(os.path.join(run_dir, "checkpoints", name))
    return run_dir


def _copy(run_dir, tmp_path) -> str:
    dst = str(tmp_path / "copy")
    shutil.copytree(run_dir, dst)
    return dst


def _flip_a_bit_in_a_weight(path: str) -> None:
    """Flip one bit inside the largest tensor's bytes (the zip's stored data record)."""
    with zipfile.ZipFile(path) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
        offset = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    data = bytearray(open(path, "rb").read())
    data[offset + info.file_size // 2] ^= 0x10
    open(path, "wb").write(bytes(data))


def _damage(path: str, how: str) -> None:
    data = open(path, "rb").read()
    if how == "truncated":
        open(path, "wb").write(data[: len(data) // 2])
    elif how == "zero-byte":
        open(path, "wb").close()
    elif how == "random":
        open(path, "wb").write(random.Random(0).randbytes(len(data)))
    elif how == "flipped bit":
        _flip_a_bit_in_a_weight(path)


def _resume_fails(run_dir: str, capsys) -> str:
    with pytest.raises(SystemExit) as e:
        main(["--resume", "--run-dir", run_dir])
    assert e.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize("name", ["ft/last.pt", "pretrain/final.pt"])
@pytest.mark.parametrize("how", ["truncated", "zero-byte", "random", "flipped bit"])
def test_a_damaged_checkpoint_is_a_clear_error(stopped_run, tmp_path, capsys, name, how):
    run_dir = _copy(stopped_run, tmp_path)
    path = os.path.join(run_dir, "checkpoints", name)
    _damage(path, how)
    err = _resume_fails(run_dir, capsys)
    assert path in err and "delete it" in err, err
    assert "Traceback" not in err
    if how == "flipped bit":
        assert "do not match the checksum" in err
    if how == "zero-byte":
        assert "empty" in err


def test_a_truncated_config_json_is_a_clear_error(stopped_run, tmp_path, capsys):
    run_dir = _copy(stopped_run, tmp_path)
    path = os.path.join(run_dir, "config.json")
    text = open(path).read()
    open(path, "w").write(text[: len(text) // 2])
    err = _resume_fails(run_dir, capsys)
    assert path in err and "damaged" in err and "new --run-dir" in err


def test_a_checkpoint_that_needs_unpickling_is_refused(stopped_run, tmp_path, capsys):
    """torch.load(weights_only=True) everywhere: a pickled numpy array (or any object) is refused
    with a clear message, never unpickled."""
    run_dir = _copy(stopped_run, tmp_path)
    path = os.path.join(run_dir, "checkpoints", "ft", "last.pt")
    torch.save({"format": checkpoint.FORMAT, "state": {"rng": np.random.get_state()}}, path)
    err = _resume_fails(run_dir, capsys)
    assert path in err and "refused" in err and "weights_only=True" in err
    with pytest.raises(SystemExit) as e:  # the sharpness subcommand's checkpoint flags too
        main(["analyze-sharpness", "--zeroshot", path, "--finetuned", path, "--run-dir", str(tmp_path / "sh")])
    assert e.value.code == 2 and "refused" in capsys.readouterr().err


def test_resume_keeps_config_json_and_removes_orphan_temporary_files(stopped_run, tmp_path, capsys):
    run_dir = _copy(stopped_run, tmp_path)
    orphans = [os.path.join(run_dir, "checkpoints", "ft", ".tmp_killed.pt"),
               os.path.join(run_dir, "checkpoints", "pretrain", ".tmp_x.pt"),
               os.path.join(run_dir, ".tmp_config.part"),
               os.path.join(run_dir, "model_config", ".tmp_model.part")]
    for p in orphans:
        open(p, "wb").write(b"partial")
    configs = [os.path.join(run_dir, "config.json"), os.path.join(run_dir, "model_config", "robustft-tiny-vit.json")]
    before = [(open(c, "rb").read(), os.stat(c).st_mtime_ns) for c in configs]
    assert main(["--resume", "--run-dir", run_dir]) == 0
    assert "removed 4 temporary file(s)" in capsys.readouterr().out
    assert not any(os.path.exists(p) for p in orphans)
    assert [(open(c, "rb").read(), os.stat(c).st_mtime_ns) for c in configs] == before  # not rewritten on resume


def test_atomic_writes_leave_the_old_file_or_the_new_one(tmp_path):
    path = str(tmp_path / "config.json")
    files.atomic_write_text(path, '{"a": 1}')

    def crash(f):
        f.write(b'{"a": 2, "b"')
        raise KeyboardInterrupt("killed while writing")

    with pytest.raises(KeyboardInterrupt):
        files.atomic_write(path, crash)
    assert open(path).read() == '{"a": 1}'
    assert os.listdir(tmp_path) == ["config.json"]


def test_checksum_and_rng_states_under_weights_only(tmp_path):
    """The RNG states are tensors and primitives (they load with weights_only=True and restore
    every generator); the checksum sees a change in any tensor."""
    state = {"w": torch.randn(5), "rng": checkpoint.rng_states(), "n": 3, "h": [{"loss": 0.5}]}
    path = str(tmp_path / "c.pt")
    checkpoint.atomic_save(state, path)
    loaded = checkpoint.load(path, advice="")
    expected = (torch.rand(2), np.random.rand(2), random.random())
    checkpoint.set_rng_states(loaded["rng"])
    assert torch.equal(torch.rand(2), expected[0]) and np.array_equal(np.random.rand(2), expected[1])
    assert random.random() == expected[2]
    changed = dict(state, w=state["w"].clone())
    changed["w"].view(torch.int32)[2] ^= 1  # the lowest bit of one float
    assert checkpoint.checksum(changed) != checkpoint.checksum(state)
    torch.save({"model": {}}, path)
    with pytest.raises(CheckpointError, match="not a robustft-train checkpoint"):
        checkpoint.load(path, advice="")


# --- a checkpoint of another run, phase, method or model (issue 19, item 1) ---------------------

FINISHED = ["--embedded-fraction", "0.3", "--pretrain-epochs", "1", "--epochs", "1", "--methods", "ft,flyp,m2mix",
            "--wise-ft-alphas", "1", "--no-plots"]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished run: final.pt of pretrain, ft, flyp and flyp+m2mix."""
    run_dir = str(tmp_path_factory.mktemp("finished") / "run")
    n = torch.get_num_threads()
    assert main(FINISHED + ["--run-dir", run_dir]) == 0
    torch.set_num_threads(n)
    return run_dir


@pytest.mark.parametrize("source, target, phase", [
    ("flyp", "flyp+m2mix", "flyp"),      # loaded silently: flyp's numbers reported as flyp+m2mix's
    ("pretrain", "flyp", "pretrain"),    # loaded silently: a pre-trained model as flyp
    ("ft", "flyp", "ft"),                # RuntimeError: Unexpected key(s) in state_dict, exit status 1
])
def test_a_final_checkpoint_of_another_phase_is_refused(finished_run, tmp_path, capsys, source, target, phase):
    run_dir = _copy(finished_run, tmp_path)
    path = os.path.join(run_dir, "checkpoints", target, "final.pt")
    shutil.copyfile(os.path.join(run_dir, "checkpoints", source, "final.pt"), path)
    err = _resume_fails(run_dir, capsys)
    assert path in err and "belongs to another run or phase" in err, err
    assert f"phase {phase!r} (this run: {target!r})" in err and "delete it to train this phase again" in err
    assert "Traceback" not in err


def _rewrite(path: str, change) -> None:
    """Save the checkpoint at `path` again (a valid checksum) after change(state)."""
    state = checkpoint.load(path, advice="")
    change(state)
    checkpoint.atomic_save(state, path)


@pytest.mark.parametrize("what, change, expected", [
    ("phase", lambda s: s["identity"].update(phase="pretrain"), "phase 'pretrain' (this run: 'ft')"),
    ("method", lambda s: s["identity"].update(method="flyp"), "method 'flyp' (this run: 'ft')"),
    ("model", lambda s: s["identity"].update(model="ViT-B-32"), "model 'ViT-B-32' (this run: 'robustft-tiny-vit')"),
    ("processes", lambda s: s["identity"].update(processes=2), "processes 2 (this run: 1)"),
    ("settings", lambda s: s["identity"]["settings"].update(lr=0.5, seed=7), "--lr 0.5 (this run: 0.0003), --seed 7"),
    ("no identity", lambda s: s.pop("identity"), "holds no record of the run that wrote it"),
])
def test_a_last_checkpoint_of_another_run_phase_method_or_model_is_refused(stopped_run, tmp_path, capsys, what,
                                                                          change, expected):
    run_dir = _copy(stopped_run, tmp_path)
    path = os.path.join(run_dir, "checkpoints", "ft", "last.pt")
    _rewrite(path, change)
    err = _resume_fails(run_dir, capsys)
    assert path in err and expected in err, err
    assert "delete it to restart this phase from its first step" in err and "Traceback" not in err


# --- a diverging run (item 4) ------------------------------------------------------------------

def test_a_diverging_run_says_where_why_and_what_to_change_and_stays_resumable(tmp_path, capsys):
    run_dir = str(tmp_path / "run")
    args = ["--embedded-fraction", "0.3", "--pretrain-epochs", "0", "--methods", "flyp", "--epochs", "2",
            "--wise-ft-alphas", "1", "--no-plots", "--lr", "1e8", "--save-every-steps", "1"]
    assert main(args + ["--run-dir", run_dir]) == EXIT_DIVERGED
    err = capsys.readouterr().err
    assert "[flyp] training diverged at step 2 of 4 (epoch 1)" in err, err
    assert "the loss term clip = nan is not finite" in err
    assert "Likely cause: the optimiser steps were too large" in err and "--lr" in err and "--grad-clip" in err
    last = os.path.join(run_dir, "checkpoints", "flyp", "last.pt")
    assert f"({last}, after step 1)" in err and "Traceback" not in err
    assert [r["step"] for r in _log_rows(run_dir, "flyp")] == [1]  # the steps before the divergence
    # the folder resumes from its last checkpoint (and diverges again at the same step)
    assert main(["--resume", "--run-dir", run_dir]) == EXIT_DIVERGED
    out, err = capsys.readouterr()
    assert "resumed from" in out and "at step 1/4" in out and "diverged at step 2 of 4" in err


def _log_rows(run_dir: str, phase: str) -> list[dict]:
    with open(os.path.join(run_dir, "logs", f"{phase}.jsonl")) as f:
        return [json.loads(line) for line in f]


# --- a malicious pickle (item 5) ---------------------------------------------------------------

class _RemovesAFile:
    """Unpickling this calls os.remove(path): code that runs on load."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return os.remove, (self.path,)


def test_a_malicious_pickle_is_refused_as_code_not_called_corrupt(stopped_run, tmp_path, capsys):
    sentinel = tmp_path / "sentinel"
    sentinel.write_text("still here")
    run_dir = _copy(stopped_run, tmp_path)
    path = os.path.join(run_dir, "checkpoints", "ft", "last.pt")
    torch.save({"format": checkpoint.FORMAT, "state": {"model": _RemovesAFile(str(sentinel))}}, path)
    err = _resume_fails(run_dir, capsys)
    assert path in err and "refused" in err and "can run code" in err and f"{os.name}.remove" in err, err
    assert "corrupt" not in err
    evil = str(tmp_path / "evil.pt")
    torch.save({"state_dict": _RemovesAFile(str(sentinel))}, evil)
    with pytest.raises(SystemExit) as e:
        main(FAST + ["--pretrained", evil, "--run-dir", str(tmp_path / "pretrained")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"--pretrained {evil}: refused" in err and "can run code" in err, err
    assert "do not fit" not in err
    assert sentinel.read_text() == "still here"  # never unpickled


# --- leftovers (item 6) --------------------------------------------------------------------------

def test_a_last_checkpoint_left_beside_its_final_one_is_removed(stopped_run, tmp_path, capsys):
    """A kill between writing final.pt and deleting last.pt."""
    run_dir = _copy(stopped_run, tmp_path)
    last = os.path.join(run_dir, "checkpoints", "ft", "last.pt")
    kept = open(last, "rb").read()
    assert main(["--resume", "--run-dir", run_dir]) == 0
    assert not os.path.exists(last)
    open(last, "wb").write(kept)
    capsys.readouterr()
    assert main(["--resume", "--run-dir", run_dir]) == 0
    assert not os.path.exists(last)
    assert f"removed {last}, left behind by an interruption" in capsys.readouterr().out


def test_atomic_writes_flush_the_folder_after_the_rename(tmp_path, monkeypatch):
    import stat

    events = []
    replace, fsync = os.replace, os.fsync
    monkeypatch.setattr(os, "replace", lambda *a: (events.append("replace"), replace(*a))[1])
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(
        "fsync folder" if stat.S_ISDIR(os.fstat(fd).st_mode) else "fsync file"), fsync(fd))[1])
    files.atomic_write_text(str(tmp_path / "a.json"), "{}")
    assert events == ["fsync file", "replace", "fsync folder"]


# --- flags a resumed run would ignore (item 7) ---------------------------------------------------

def test_resume_refuses_flags_that_differ_from_the_runs_settings(stopped_run, tmp_path, capsys):
    run_dir = _copy(stopped_run, tmp_path)
    with pytest.raises(SystemExit) as e:
        main(["--resume", "--run-dir", run_dir, "--epochs", "5", "--lr", "0.5", "--methods", "flyp", "--seed", "0",
              "--workers", "0", "--no-plots"])
    err = capsys.readouterr().err
    assert e.value.code == 2
    assert (f"--resume continues the run with the settings of {run_dir}/config.json; these flags differ from them "
            "and cannot change on resume: --epochs 5 (the run's: 3), --lr 0.5 (the run's: 0.0003), --methods 'flyp' "
            "(the run's: 'ft')") in err, err
    assert "--seed" not in err.split("cannot change on resume")[1].split(". Drop")[0]  # the same as the run's
    assert not os.path.exists(os.path.join(run_dir, "checkpoints", "ft", "final.pt"))  # nothing trained


def test_given_flags_are_the_command_lines_not_the_defaults():
    from robustft_train.flags import given_flags, training_parser

    given = given_flags(training_parser(), ["--lr", "0.5", "--eval-data", "a=b", "--no-plots", "--resume"])
    assert given == {"lr": 0.5, "eval_data": ["a=b"], "no_plots": True, "resume": True}


# --- other libraries' error text (item 8) --------------------------------------------------------

def test_an_error_text_is_shortened_at_a_sentence_or_line_never_inside_one(tmp_path, monkeypatch):
    first = "PytorchStreamReader failed reading zip archive: failed finding central directory " + "x" * 150 + "."
    second = "Another sentence that would pass the limit " + "y" * 200 + "."
    monkeypatch.setattr(torch, "load", lambda *a, **k: (_ for _ in ()).throw(RuntimeError(f"{first} {second}\nmore")))
    path = tmp_path / "c.pt"
    path.write_bytes(b"something")
    with pytest.raises(CheckpointError) as e:
        checkpoint.load(str(path), advice="do this")
    assert f"({first} ...)" in str(e.value), str(e.value)
    assert excerpt("line one.\nline two.") == "line one. line two."
    assert excerpt("a" * 500) == "a" * 500  # one long sentence is kept whole
    assert excerpt("One. Two. " + "b" * 400, limit=20) == "One. Two. ..."
