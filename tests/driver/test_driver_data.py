"""robustft-train on real data: image folders and CSVs the test writes, a model config JSON, a local
weights file; and every bad input gives a clear error before training starts."""
from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("open_clip", exc_type=ImportError)  # robustft_train imports it

from robustft_train.cli import main
from robustft_train.models import EMBEDDED_MODEL_CONFIG

CLASSES = {"red_thing": (220, 30, 30), "green_thing": (30, 200, 40), "blue_thing": (30, 40, 220)}
OTHER = {"black_thing": (10, 10, 10), "white_thing": (245, 245, 245)}
FAST = ["--epochs", "2", "--batch-size", "8", "--lr", "1e-3", "--warmup-steps", "2",
        "--wise-ft-alphas", "0,1", "--no-plots", "--threads", "1"]


@pytest.fixture(autouse=True)
def _keep_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _image(path, rgb, seed, invert=False) -> None:
    rng = np.random.default_rng(seed)
    arr = np.clip(np.array(rgb)[None, None] + rng.normal(0, 25, (32, 32, 3)), 0, 255).astype(np.uint8)
    if invert:
        arr = 255 - arr
    Image.fromarray(arr).save(path)


def _folder(root, classes, n, seed, invert=False) -> str:
    for k, (name, rgb) in enumerate(classes.items()):
        os.makedirs(root / name, exist_ok=True)
        for i in range(n):
            _image(root / name / f"{i}.png", rgb, seed + 100 * k + i, invert)
    return str(root)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    d = {"train": _folder(root / "train", CLASSES, 10, 0), "id": _folder(root / "id", CLASSES, 4, 1000),
         "inverted": _folder(root / "inverted", CLASSES, 4, 2000, invert=True),
         "zs": _folder(root / "zs", OTHER, 4, 3000)}
    (root / "train" / "red_thing" / "corrupt.png").write_bytes(b"not a png at all")
    (root / "classnames.txt").write_text("red thing\ngreen thing\nblue thing\n")
    (root / "templates.txt").write_text("a photo of a {}.\na picture of the {}.\n")
    (root / "model.json").write_text(json.dumps(EMBEDDED_MODEL_CONFIG))
    torch.manual_seed(0)
    import open_clip
    from robustft_train.models import register_config

    register_config("driver-test-tiny", EMBEDDED_MODEL_CONFIG, str(root / "cfg"))
    model = open_clip.create_model("driver-test-tiny")
    torch.save(model.state_dict(), root / "weights.pt")
    other = dict(EMBEDDED_MODEL_CONFIG, embed_dim=32)
    register_config("driver-test-other", other, str(root / "cfg"))
    torch.save(open_clip.create_model("driver-test-other").state_dict(), root / "wrong_weights.pt")
    # a CSV of images and captions (open_clip's columns, tab-separated) with labels, for training
    # and for an evaluation set with captions (retrieval)
    lines = ["filepath\ttitle\tlabel"]
    for k, name in enumerate(CLASSES):
        for i in range(10):
            lines.append(f"train/{name}/{i}.png\ta photo of a {name.replace('_', ' ')}, number {i}\t{name}")
    (root / "train.csv").write_text("\n".join(lines) + "\n")
    (root / "captions.csv").write_text("\n".join("\t".join(line.split("\t")[:2]) for line in lines) + "\n")
    lines = ["filepath\ttitle\tlabel"]
    for k, name in enumerate(CLASSES):
        for i in range(4):
            lines.append(f"id/{name}/{i}.png\t{name.replace('_', ' ')} sample {i}\t{k}")
    (root / "eval.csv").write_text("\n".join(lines) + "\n")
    d.update({k: str(root / f) for k, f in (("classnames", "classnames.txt"), ("templates", "templates.txt"),
                                            ("model", "model.json"), ("weights", "weights.pt"),
                                            ("wrong_weights", "wrong_weights.pt"), ("train_csv", "train.csv"),
                                            ("captions_csv", "captions.csv"),
                                            ("eval_csv", "eval.csv"))})
    d["root"] = str(root)
    return d


def _rows(run_dir) -> list[dict]:
    with open(os.path.join(run_dir, "results.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_image_folder_data_model_json_and_weights(data, tmp_path, capsys):
    run_dir = str(tmp_path / "run")
    code = main(FAST + ["--run-dir", run_dir, "--model", data["model"], "--pretrained", data["weights"],
                        "--train-data", data["train"], "--eval-data", f"id={data['id']}",
                        "--eval-data", f"inverted={data['inverted']}", "--zeroshot-data", f"colours={data['zs']}",
                        "--classnames", data["classnames"], "--templates", data["templates"],
                        "--methods", "zeroshot,ft,flyp"])
    assert code == 0
    out = capsys.readouterr().out
    assert "skipped 1 unreadable image(s) of 31" in out
    rows = _rows(run_dir)
    assert {r["method"] for r in rows} == {"zeroshot", "ft", "flyp"}
    roles = {r["eval_set"]: r["role"] for r in rows}
    assert roles == {"id": "id", "inverted": "ood", "colours": "zeroshot"}
    for r in rows:
        assert math.isfinite(r["top1"]) and math.isfinite(r["ece"]) and math.isfinite(r["uniformity"])
        assert r["n"] == {"id": 12, "inverted": 12, "colours": 8}[r["eval_set"]]
    cfg = json.load(open(os.path.join(run_dir, "config.json")))
    assert cfg["lr"] == 1e-3 and cfg["weight_decay"] == 0.1 and not cfg["embedded"]
    # the zero-shot model is the weights file: alpha 0 of flyp evaluates exactly it
    zs = {r["eval_set"]: r["top1"] for r in rows if r["method"] == "zeroshot"}
    flyp0 = {r["eval_set"]: r["top1"] for r in rows if r["method"] == "flyp" and r["alpha"] == 0.0}
    assert zs == flyp0


def test_csv_data_with_captions_gives_retrieval(data, tmp_path):
    run_dir = str(tmp_path / "run")
    code = main(FAST + ["--run-dir", run_dir, "--model", data["model"], "--train-data", data["train_csv"],
                        "--csv-label-key", "label", "--eval-data", f"id={data['eval_csv']}",
                        "--methods", "ft,flyp"])
    assert code == 0
    rows = _rows(run_dir)
    assert {r["method"] for r in rows} == {"ft", "flyp"}
    for r in rows:
        for key in ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10"):
            assert 0 <= r[key] <= 1
        assert r["i2t_r1"] <= r["i2t_r5"] <= r["i2t_r10"] and r["t2i_r1"] <= r["t2i_r5"] <= r["t2i_r10"]
        assert 0 <= r["top1"] <= 1


def test_caption_only_csv_trains_flyp(data, tmp_path):
    """A CSV of images and captions without labels trains FLYP on its own captions; the class names
    (--classnames) name the evaluation folder's classes (sub-folders 'red_thing' = 'red thing')."""
    run_dir = str(tmp_path / "run")
    code = main(FAST + ["--run-dir", run_dir, "--model", data["model"], "--train-data", data["captions_csv"],
                        "--classnames", data["classnames"], "--eval-data", f"id={data['id']}",
                        "--methods", "flyp"])
    assert code == 0
    rows = _rows(run_dir)
    assert {r["method"] for r in rows} == {"flyp"} and all(0 <= r["top1"] <= 1 for r in rows)


BAD_INPUTS = [
    # (name, extra args (with {placeholders} from the data fixture), what the message must say)
    ("missing train path", ["--train-data", "{root}/nope", "--eval-data", "id={id}"],
     "--train-data: no such file or folder"),
    ("missing eval path", ["--train-data", "{train}", "--eval-data", "id={root}/nope"], "no such file or folder"),
    ("no eval set", ["--train-data", "{train}"], "--eval-data: give at least one evaluation set"),
    ("empty data folder", ["--train-data", "{empty}", "--eval-data", "id={id}"], "no class sub-folders"),
    ("class folders without images", ["--train-data", "{noimages}", "--eval-data", "id={id}"],
     "holds no image files"),
    ("only unreadable images", ["--train-data", "{unreadable}", "--eval-data", "id={id}"],
     "none of the images is readable"),
    ("eval classes differ", ["--train-data", "{train}", "--eval-data", "id={zs}"], "are not training classes"),
    ("classnames count", ["--train-data", "{train}", "--eval-data", "id={id}", "--classnames", "{twonames}"],
     "2 names for 3 class sub-folders"),
    ("unknown model", ["--model", "ViT-B-33", "--train-data", "{train}", "--eval-data", "id={id}"],
     "is not an open_clip model name"),
    ("weights do not fit", ["--model", "{model}", "--pretrained", "{wrong_weights}", "--train-data", "{train}",
                            "--eval-data", "id={id}"], "do not fit model"),
    ("missing weights", ["--pretrained", "{root}/none.pt"], "--pretrained: no such file"),
    ("csv column", ["--train-data", "{train_csv}", "--csv-caption-key", "caption", "--eval-data", "id={id}"],
     "no column 'caption'"),
    ("ft without labels", ["--model", "{model}", "--train-data", "{captions_csv}", "--classnames",
                           "{classnames}", "--eval-data", "id={id}", "--methods", "ft"], "needs class labels"),
    ("bad template", ["--train-data", "{train}", "--eval-data", "id={id}", "--templates", "{classnames}"],
     "every template needs"),
    ("id-eval name", ["--train-data", "{train}", "--eval-data", "id={id}", "--id-eval", "val"],
     "--id-eval 'val' is not one of"),
    ("eval spec", ["--train-data", "{train}", "--eval-data", "{id}"], "expected NAME=PATH"),
    ("lr", ["--lr", "-1"], "--lr must be a positive number"),
    ("lr nan", ["--lr", "nan"], "--lr must be a positive number"),
    ("batch size", ["--batch-size", "1"], "--batch-size must be >= 2"),
    ("epochs", ["--epochs", "0"], "--epochs must be >= 1"),
    ("accum", ["--accum-steps", "0"], "--accum-steps must be >= 1"),
    ("m2mix alpha", ["--m2mix-alpha", "0"], "--m2mix-alpha must be > 0"),
    ("m2mix weight", ["--m2mix-weight", "-0.1"], "--m2mix-weight must be > 0"),
    ("dive momentum", ["--dive-momentum", "1"], "--dive-momentum must be in [0, 1)"),
    ("lipsum texts", ["--lipsum-num-texts", "0"], "--lipsum-num-texts must be >= 1"),
    ("alphas range", ["--wise-ft-alphas", "0,1.5"], "alphas must lie in [0, 1]"),
    ("alphas syntax", ["--wise-ft-alphas", "a,b"], "expected comma-separated numbers"),
    ("unknown method", ["--methods", "flyp,sgd"], "unknown method 'sgd'"),
    ("bad combination", ["--methods", "ft+m2mix"], "m2mix needs the flyp base"),
    ("two bases", ["--methods", "ft+flyp"], "combines two bases"),
    ("zeroshot combined", ["--methods", "zeroshot+flyp"], "zeroshot cannot be combined"),
    ("duplicate method", ["--methods", "m2mix,flyp+m2mix"], "given twice"),
    ("precision", ["--precision", "fp8"], "invalid choice"),
    ("resume of no run", ["--resume"], "config.json does not exist (not a run folder"),
    ("embedded with eval data", ["--eval-data", "x={id}"], "need --train-data"),
    ("too few images for a step", ["--model", "{model}", "--train-data", "{train}", "--eval-data", "id={id}",
                                   "--batch-size", "64", "--methods", "flyp"], "fewer than one optimiser step"),
]


@pytest.mark.parametrize("name,args,message", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_is_a_clear_error_before_training(name, args, message, data, tmp_path, capsys):
    root = tmp_path / "extra"
    (root / "empty").mkdir(parents=True)
    (root / "noimages" / "a").mkdir(parents=True)
    (root / "noimages" / "a" / "notes.txt").write_text("x")
    (root / "unreadable" / "a").mkdir(parents=True)
    (root / "unreadable" / "a" / "x.png").write_bytes(b"garbage")
    (root / "twonames.txt").write_text("one\ntwo\n")
    paths = dict(data, empty=str(root / "empty"), noimages=str(root / "noimages"),
                 unreadable=str(root / "unreadable"), twonames=str(root / "twonames.txt"))
    run_dir = tmp_path / "run"
    argv = [a.format(**paths) for a in args] + ["--run-dir", str(run_dir), "--no-plots", "--threads", "1"]
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert not (run_dir / "checkpoints").exists()  # nothing was trained
