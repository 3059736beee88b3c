"""The embedded default: scikit-learn's handwritten digits (1797 images of 8x8 pixels, shipped inside
the scikit-learn package, so offline), upsampled to 32x32 RGB.

Splits (fixed by DATA_SEED, independent of --seed):
- pretrain: PRETRAIN_FRACTION of all images, all ten classes, captioned; a short contrastive
  pre-training on it makes the "zero-shot" model;
- the rest of digits 0-4: fine-tuning train (captioned) / val (ID validation, selects the WiSE-FT
  alpha) / test (ID test, captioned: image-text retrieval); test images under four
  deterministic shifts: rotate, invert, noise, blur;
- the rest of digits 5-9: a zero-shot task the fine-tuning never sees (its classes never appear in
  fine-tuning), classified from prompts only: it shows what fine-tuning forgets.

Captions (fine-tuning train and test) name the digit through one of the templates and describe
the image itself: its stroke width and its slant, each in three levels (the terciles over all
digits), e.g. "a handwritten four, thick strokes, leaning right." So a caption fits a few images
rather than a whole class, and retrieval on the captioned test set asks for more than the class;
flyp and its regularisers fine-tune on these captions (FLYP: the pre-training objective on the
data's own captions), ft on the labels.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from sklearn.datasets import load_digits

from .data import EvalSet, TensorImageSet, TrainSource, fill_template

DIGIT_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
FINETUNE_CLASSES = [0, 1, 2, 3, 4]
ZEROSHOT_CLASSES = [5, 6, 7, 8, 9]
TEMPLATES = ["a photo of the digit {}.", "a handwritten {}.", "the number {}.", "a drawing of a {}.",
             "a scan of the digit {}.", "{} written by hand."]
STROKES = ("thin", "medium", "thick")
SLANTS = ("leaning left", "upright", "leaning right")
IMAGE_SIZE = 32
ID_SET = "val"  # the ID validation set (it picks the WiSE-FT alpha)
DATA_SEED = 1234
PRETRAIN_FRACTION = 0.45
PRETRAIN_LR = 2e-3
PRETRAIN_BATCH_SIZE = 64
SHIFTS = ("rotate", "invert", "noise", "blur")


def _load_digits() -> tuple[torch.Tensor, np.ndarray]:
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # [N, 1, 8, 8] in [0, 1]
    x = F.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
    return x.clamp(0, 1), digits.target.astype(np.int64)


def _to_model_input(x: torch.Tensor) -> torch.Tensor:
    """[N, 1, H, W] in [0, 1] -> [N, 3, H, W] normalised to mean 0.5, std 0.5."""
    return ((x - 0.5) / 0.5).expand(-1, 3, -1, -1).contiguous()


def _tercile(values: torch.Tensor) -> torch.Tensor:
    """0, 1 or 2: which third of the values each one falls in."""
    lo, hi = torch.quantile(values, torch.tensor([1 / 3, 2 / 3]))
    return (values > lo).long() + (values > hi).long()


def captions(x: torch.Tensor, labels: np.ndarray) -> list[str]:
    """One caption per [N, 1, H, W] image: a template (by index) with the digit's name, its stroke
    width (ink mass) and its slant (the shear of the ink's second moments), each by tercile."""
    n, _, h, w = x.shape
    ink = x[:, 0]
    mass = ink.sum((1, 2))
    ys = torch.arange(h, dtype=torch.float32).view(1, h, 1)
    xs = torch.arange(w, dtype=torch.float32).view(1, 1, w)
    y0 = (ink * ys).sum((1, 2)) / mass
    x0 = (ink * xs).sum((1, 2)) / mass
    dy, dx = ys - y0.view(n, 1, 1), xs - x0.view(n, 1, 1)
    # x grows to the right, y downwards: the top of a right-leaning stroke is further right
    shear = -(ink * dx * dy).sum((1, 2)) / (ink * dy * dy).sum((1, 2))
    stroke, slant = _tercile(mass), _tercile(shear)
    out = []
    for i in range(n):
        head = fill_template(TEMPLATES[i % len(TEMPLATES)], DIGIT_NAMES[int(labels[i])]).rstrip(".")
        out.append(f"{head}, {STROKES[stroke[i]]} strokes, {SLANTS[slant[i]]}.")
    return out


def shift(x: torch.Tensor, kind: str, seed: int) -> torch.Tensor:
    """A deterministic distribution shift of [N, 1, H, W] images in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    if kind == "rotate":
        angles = (25 + 10 * torch.rand(len(x), generator=g)) * torch.where(
            torch.rand(len(x), generator=g) < 0.5, -1.0, 1.0)
        return torch.stack([TF.rotate(img, float(a)) for img, a in zip(x, angles)])
    if kind == "invert":
        return 1.0 - x
    if kind == "noise":
        return (x + 0.35 * torch.randn(x.shape, generator=g)).clamp(0, 1)
    if kind == "blur":
        return TF.gaussian_blur(x, kernel_size=7, sigma=2.0)
    raise ValueError(f"unknown shift {kind!r}")


def build(fraction: float = 1.0, model_size: int | tuple[int, int] = IMAGE_SIZE
          ) -> tuple[TrainSource, TrainSource, list[EvalSet], list[str]]:
    """(pretraining source, fine-tuning source, evaluation sets, templates); images are resized
    to `model_size` when a --model with another input size is used."""
    size = (model_size, model_size) if isinstance(model_size, int) else tuple(model_size)
    x, y = _load_digits()
    all_captions = captions(x, y)
    rng = np.random.default_rng(DATA_SEED)
    order = rng.permutation(len(y))
    order = order[: max(40, int(round(fraction * len(order))))]
    n_pre = int(PRETRAIN_FRACTION * len(order))
    pre, rest = order[:n_pre], order[n_pre:]
    ft_idx = np.array([i for i in rest if y[i] in FINETUNE_CLASSES])
    zs_idx = np.array([i for i in rest if y[i] in ZEROSHOT_CLASSES])
    n_train, n_val = int(0.6 * len(ft_idx)), int(0.15 * len(ft_idx))
    train, val, test = ft_idx[:n_train], ft_idx[n_train:n_train + n_val], ft_idx[n_train + n_val:]

    def tensor_set(idx: np.ndarray, images: torch.Tensor | None = None,
                   label_map: list[int] | None = None, captioned: bool = False) -> TensorImageSet:
        imgs = x[idx] if images is None else images
        labels = [int(v) for v in y[idx]]
        if label_map is not None:
            labels = [label_map.index(v) for v in labels]
        texts = [all_captions[i] for i in idx] if captioned else None
        return TensorImageSet(_to_model_input(imgs), labels, texts, size=size)

    pretrain = TrainSource(tensor_set(pre), list(DIGIT_NAMES))
    ft_names = [DIGIT_NAMES[c] for c in FINETUNE_CLASSES]
    finetune = TrainSource(tensor_set(train, label_map=FINETUNE_CLASSES, captioned=True), ft_names)
    evals = [EvalSet(ID_SET, "id", tensor_set(val, label_map=FINETUNE_CLASSES), ft_names),
             EvalSet("test", "id", tensor_set(test, label_map=FINETUNE_CLASSES, captioned=True), ft_names)]
    for k, kind in enumerate(SHIFTS):
        shifted = shift(x[test], kind, DATA_SEED + k)
        evals.append(EvalSet(kind, "ood", tensor_set(test, shifted, FINETUNE_CLASSES), ft_names))
    evals.append(EvalSet("digits5-9", "zeroshot", tensor_set(zs_idx, label_map=ZEROSHOT_CLASSES),
                         [DIGIT_NAMES[c] for c in ZEROSHOT_CLASSES]))
    return pretrain, finetune, evals, list(TEMPLATES)
