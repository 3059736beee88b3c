"""patch_open_clip and robustft-open-clip-train: open_clip's create_loss builds our losses, the
patch undoes cleanly, and open_clip's own trainer (open_clip_train) logs the same losses step
for step with and without it (CLIP, SigLIP, and 2 gloo processes with local loss and gathered
gradients), on a small CSV data set of distinct images and captions written here."""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import robustft_ext
from robustft_ext.open_clip_patch import OpenClipPatch, patch_open_clip

open_clip = pytest.importorskip("open_clip", exc_type=ImportError)
factory = pytest.importorskip("open_clip.factory", exc_type=ImportError)


def _create_loss_args(**overrides) -> argparse.Namespace:
    """The attributes open_clip.create_loss reads from open_clip_train's arguments."""
    args = dict(distill=False, model="ViT-B-32", siglip=False, local_loss=False,
                gather_with_grad=False, rank=0, world_size=1, horovod=False,
                loss_dist_impl=None)
    args.update(overrides)
    return argparse.Namespace(**args)


def test_create_loss_builds_ours_and_undo_restores():
    from open_clip import create_loss  # bound before patching, as open_clip_train binds it
    original_clip, original_siglip = factory.ClipLoss, factory.SigLipLoss
    patch = patch_open_clip()
    try:
        assert isinstance(patch, OpenClipPatch) and patch.active
        assert set(patch.names) == {"ClipLoss", "SigLipLoss"}
        loss = create_loss(_create_loss_args(local_loss=True, gather_with_grad=True))
        assert isinstance(loss, robustft_ext.ClipLoss)
        assert loss.local_loss and loss.gather_with_grad and loss.backend is None
        assert isinstance(create_loss(_create_loss_args(siglip=True)), robustft_ext.SigLipLoss)
        # open_clip's other losses and open_clip.loss itself are untouched
        assert open_clip.loss.ClipLoss is original_clip
        distill = create_loss(_create_loss_args(distill=True))
        assert type(distill) is open_clip.loss.DistillClipLoss
    finally:
        patch.undo()
    assert not patch.active
    assert factory.ClipLoss is original_clip and factory.SigLipLoss is original_siglip
    assert type(create_loss(_create_loss_args())) is original_clip
    patch.undo()  # a second undo does nothing
    assert factory.ClipLoss is original_clip


def test_patched_loss_equals_open_clips():
    torch.manual_seed(0)
    image = torch.nn.functional.normalize(torch.randn(12, 16, dtype=torch.float64), dim=1)
    text = torch.nn.functional.normalize(torch.randn(12, 16, dtype=torch.float64), dim=1)
    scale = torch.tensor(14.3, dtype=torch.float64)
    args = _create_loss_args()
    expected = open_clip.create_loss(args)(image, text, scale)
    with patch_open_clip():
        ours = open_clip.create_loss(args)
        got = ours(image, text, scale)
    assert isinstance(ours, robustft_ext.ClipLoss)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_context_manager_backend_and_selection():
    original = factory.ClipLoss
    with patch_open_clip(siglip=False, backend="reference") as patch:
        assert patch.names == ("ClipLoss",)
        assert factory.SigLipLoss is open_clip.loss.SigLipLoss
        loss = open_clip.create_loss(_create_loss_args())
        assert loss.backend == "reference"
        assert "active" in repr(patch)
    assert factory.ClipLoss is original and "undone" in repr(patch)


def test_nested_patches_undo_in_reverse_order():
    original = factory.ClipLoss
    outer = patch_open_clip(backend="reference")
    inner = patch_open_clip(backend="native")
    try:
        assert open_clip.create_loss(_create_loss_args()).backend == "native"
        with pytest.raises(RuntimeError, match="undo the later patch first"):
            outer.undo()
        inner.undo()
        assert open_clip.create_loss(_create_loss_args()).backend == "reference"
    finally:
        inner.undo()
        outer.undo()
    assert factory.ClipLoss is original


def test_bad_arguments():
    with pytest.raises(ValueError, match="backend must be one of"):
        patch_open_clip(backend="cuda")
    with pytest.raises(ValueError, match="nothing to patch"):
        patch_open_clip(clip=False, siglip=False)
    assert factory.ClipLoss is open_clip.loss.ClipLoss


# ---- open_clip_train end to end ------------------------------------------------------------

TINY_MODEL = {"embed_dim": 32,
              "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16,
                             "patch_size": 8},
              "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2,
                           "layers": 1}}
SAMPLES = 48
COMMON_FLAGS = ["--dataset-type", "csv", "--csv-separator", ",", "--epochs", "1",
                "--workers", "0", "--lr", "1e-3", "--warmup", "2", "--log-every-n-steps", "1",
                "--seed", "0", "--save-frequency", "0", "--precision", "fp32"]
# The DDP wrapper open_clip_train builds passes device_ids=[cpu], which torch refuses for a
# CPU module; this launcher drops device_ids on CPU (for both runs alike) and then runs the
# named module as __main__.
CPU_DDP_LAUNCHER = '''import runpy, sys, torch
_DDP = torch.nn.parallel.DistributedDataParallel
class _CpuDDP(_DDP):
    def __init__(self, module, device_ids=None, *args, **kwargs):
        if device_ids and all(torch.device(d).type == "cpu" for d in device_ids):
            device_ids = None
        super().__init__(module, device_ids, *args, **kwargs)
torch.nn.parallel.DistributedDataParallel = _CpuDDP
module = sys.argv.pop(1)
runpy.run_module(module, run_name="__main__", alter_sys=True)
'''
_TRAIN_LINE = re.compile(r"Train Epoch: (\d+) \[\s*(\d+)/\d+ .*Logit Scale: (\S+) (.*)$")
_LOSS = re.compile(r"(\w+): (\S+) \(\S+\)")


@pytest.fixture(scope="module")
def open_clip_train_setup(tmp_path_factory) -> Path:
    """A folder with train.csv (distinct random images, distinct captions), a local-dir model
    config (no weights: open_clip_train initialises it from --seed) and the DDP launcher."""
    pytest.importorskip("open_clip_train.main", reason="open_clip_train's requirements "
                        "(pip install -r requirements.txt)")
    from PIL import Image

    root = tmp_path_factory.mktemp("open_clip_train")
    (root / "images").mkdir()
    generator = torch.Generator().manual_seed(0)
    colours = ["red", "green", "blue", "yellow", "purple", "orange", "white", "black"]
    shapes = ["circle", "square", "stripe", "cross", "dot", "ring"]
    rows = ["filepath,title"]
    for k in range(SAMPLES):
        pixels = torch.randint(0, 256, (32, 32, 3), generator=generator, dtype=torch.uint8)
        path = root / "images" / f"{k}.png"
        Image.fromarray(pixels.numpy()).save(path)
        rows.append(f"{path},a {colours[k % 8]} {shapes[k // 8]} number {k}")
    (root / "train.csv").write_text("\n".join(rows) + "\n")
    (root / "model").mkdir()
    (root / "model" / "open_clip_config.json").write_text(
        json.dumps({"model_cfg": TINY_MODEL, "preprocess_cfg": {}}))
    (root / "cpu_ddp_launch.py").write_text(CPU_DDP_LAUNCHER)
    return root


def _train(root: Path, name: str, command: list[str],
           flags: list[str]) -> tuple[list[tuple], bool]:
    """Run open_clip_train (through `command`) in `root`; the logged (sample count, logit scale,
    losses) of every step, and whether robustft_ext's loss was built."""
    env = dict(os.environ, OMP_NUM_THREADS="1")  # one thread: open_clip_train is then repeatable
    args = ["--train-data", str(root / "train.csv"), "--model", f"local-dir:{root / 'model'}",
            *COMMON_FLAGS, *flags, "--name", name]
    done = subprocess.run(command + args, cwd=root, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, f"{name} failed:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    log = (root / "logs" / name / "out.log").read_text()
    steps = []
    for line in log.splitlines():
        match = _TRAIN_LINE.search(line)
        if match:
            epoch, samples, scale, losses = match.groups()
            steps.append((int(epoch), int(samples), scale, dict(_LOSS.findall(losses))))
    return steps, "robustft_ext: open_clip's create_loss built robustft_ext." in log


def _console_script() -> list[str]:
    exe = shutil.which("robustft-open-clip-train") or os.path.join(
        os.path.dirname(sys.executable), "robustft-open-clip-train")
    assert os.path.exists(exe), "robustft-open-clip-train is not installed (pip install -e .)"
    return [exe]


def _assert_same_steps(plain, patched, batch_size: int, world_size: int = 1) -> None:
    (steps_plain, ours_in_plain), (steps_patched, ours_in_patched) = plain, patched
    assert not ours_in_plain and ours_in_patched
    assert len(steps_plain) == SAMPLES // (batch_size * world_size)
    assert steps_patched == steps_plain  # every step: samples, logit scale, each loss, 5 digits
    losses = [float(step[3]["Loss"]) for step in steps_plain]
    assert all(set(step[3]) == {"Contrastive_loss", "Loss"} for step in steps_plain)
    assert torch.isfinite(torch.tensor(losses)).all() and len(set(losses)) == len(losses)


@pytest.mark.slow
@pytest.mark.parametrize("flags", [[], ["--siglip"]], ids=["clip", "siglip"])
def test_open_clip_train_same_losses(open_clip_train_setup: Path, flags: list[str]):
    root, tag = open_clip_train_setup, "siglip" if flags else "clip"
    flags = flags + ["--batch-size", "8"]
    plain = _train(root, f"{tag}-open_clip", [sys.executable, "-m", "open_clip_train.main"], flags)
    patched = _train(root, f"{tag}-robustft", _console_script(), flags)
    _assert_same_steps(plain, patched, batch_size=8)


@pytest.mark.slow
@pytest.mark.distributed
def test_open_clip_train_distributed_local_loss(open_clip_train_setup: Path):
    root = open_clip_train_setup
    flags = ["--batch-size", "4", "--local-loss", "--gather-with-grad"]

    def torchrun(module: str) -> list[str]:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc_per_node", "2", str(root / "cpu_ddp_launch.py"), module]

    plain = _train(root, "ddp-open_clip", torchrun("open_clip_train.main"), flags)
    patched = _train(root, "ddp-robustft", torchrun("robustft_ext.open_clip_patch"), flags)
    _assert_same_steps(plain, patched, batch_size=4, world_size=2)
    log = (root / "logs" / "ddp-robustft" / "out.log").read_text()
    assert "total 2" in log and "local_loss: True" in log and "gather_with_grad: True" in log


def test_console_script_help():
    pytest.importorskip("open_clip_train.main")
    done = subprocess.run(_console_script() + ["--help"], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    for flag in ("--train-data", "--siglip", "--local-loss", "--gather-with-grad"):
        assert flag in done.stdout
