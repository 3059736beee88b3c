"""Data: image folders and CSVs of (image, caption[, label]) as open_clip reads them, in-memory tensor
sets (the embedded default), class names and prompt templates, the training view that pairs each
image with its caption or a prompt, and the evaluation sets.

Unreadable images are skipped and counted, never fatal while one readable image is left. The
scan when a set is loaded opens every file: evaluation sets are decoded in full there, training
sets only verified (PIL's verify(), which reads no pixels: decoding a large training set up front
would cost a pass over it). A training image that passes verify() and still fails to decode (a
truncated JPEG) is skipped when it is drawn: the training view takes the next index instead, and
the training loop counts the skipped files."""
from __future__ import annotations

import csv
import os
from concurrent.futures import ThreadPoolExecutor
import random
import warnings
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from PIL import Image
from torch.utils.data import Dataset

from .errors import DriverError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")

# The built-in prompt templates (a subset of CLIP's ImageNet templates, as open_clip's SIMPLE set).
DEFAULT_TEMPLATES: list[str] = [
    "a photo of a {}.", "a bad photo of a {}.", "a photo of many {}.", "a sculpture of a {}.",
    "a rendering of a {}.", "a cropped photo of a {}.", "a photo of the large {}.",
    "a photo of the small {}.", "itap of a {}.", "art of the {}.", "a low resolution photo of a {}.",
    "a close-up photo of a {}.",
]


def fill_template(template: str, classname: str) -> str:
    """Put a class name into a template written with '{}' or '{c}'."""
    return template.replace("{c}", classname).replace("{}", classname)


class ImageSet(Dataset):
    """Images with optional integer labels (-1: none) and optional captions.

    `image(i)` returns the transformed image tensor; `__getitem__` returns (image, label, caption).
    """

    labels: list[int]
    captions: list[str] | None

    def __len__(self) -> int:
        return len(self.labels)

    def image(self, i: int) -> torch.Tensor:
        raise NotImplementedError

    def __getitem__(self, i: int):
        return self.image(i), self.labels[i], (self.captions[i] if self.captions else "")

    @property
    def has_labels(self) -> bool:
        return len(self.labels) > 0 and min(self.labels) >= 0

    @property
    def has_captions(self) -> bool:
        return self.captions is not None


class TensorImageSet(ImageSet):
    """Images already in memory as a [N, C, H, W] float tensor (the embedded default), resized
    bilinearly on the fly when the model takes another `size`."""

    def __init__(self, images: torch.Tensor, labels: Sequence[int], captions: list[str] | None = None,
                 size: tuple[int, int] | None = None):
        self.images = images
        self.labels = [int(v) for v in labels]
        self.captions = captions
        self.size = None if size is None or tuple(size) == tuple(images.shape[-2:]) else tuple(size)

    def image(self, i: int) -> torch.Tensor:
        img = self.images[i]
        if self.size is not None:
            img = torch.nn.functional.interpolate(img[None], size=self.size, mode="bilinear",
                                                  align_corners=False)[0]
        return img


class UnreadableImageError(OSError):
    """An image file that cannot be decoded (its path is `path`)."""

    def __init__(self, path: str, cause: BaseException):
        super().__init__(f"cannot decode image {path}: {cause}")
        self.path = path


class FileImageSet(ImageSet):
    """Image files read with PIL and transformed with the model's open_clip preprocessing."""

    def __init__(self, paths: list[str], labels: Sequence[int], captions: list[str] | None,
                 transform: Callable | None = None):
        self.paths = paths
        self.labels = [int(v) for v in labels]
        self.captions = captions
        self.transform = transform

    def image(self, i: int) -> torch.Tensor:
        try:
            with Image.open(self.paths[i]) as img:
                img = img.convert("RGB")
        except Exception as e:  # PIL raises OSError, ValueError, DecompressionBombError...
            raise UnreadableImageError(self.paths[i], e) from e
        return self.transform(img)


def _verifies(path: str) -> bool:
    try:
        with Image.open(path) as img:
            img.verify()
        return True
    except Exception:  # noqa: BLE001 - any failure makes the file unreadable
        return False


def _decodes(path: str) -> bool:
    try:
        with Image.open(path) as img:
            img.convert("RGB")
        return True
    except Exception:  # noqa: BLE001 - any failure makes the file unreadable
        return False


def _drop_unreadable(flag: str, paths: list[str], *columns: list, decode: bool = True) -> tuple:
    """Keep the readable images (decoded in full, or with decode=False only verified; checked in a
    thread pool); warn with the count of the others."""
    check = _decodes if decode else _verifies
    with ThreadPoolExecutor(max_workers=min(16, (os.cpu_count() or 1) * 2)) as pool:
        ok = list(pool.map(check, paths, chunksize=64))
    keep = [i for i, good in enumerate(ok) if good]
    bad = len(paths) - len(keep)
    if bad:
        examples = [p for p, good in zip(paths, ok) if not good][:3]
        warnings.warn(f"{flag}: skipped {bad} unreadable image(s) of {len(paths)} (e.g. {examples})",
                      stacklevel=2)
    return ([paths[i] for i in keep],) + tuple(
        None if col is None else [col[i] for i in keep] for col in columns) + (bad,)


def read_lines(path: str, flag: str) -> list[str]:
    try:
        with open(path, encoding="utf-8") as f:
            lines = [line.strip() for line in f if line.strip() and not line.startswith("#")]
    except OSError as e:
        raise DriverError(f"{flag} {path}: cannot read it: {e}") from e
    if not lines:
        raise DriverError(f"{flag} {path}: the file is empty")
    return lines


def read_templates(path: str | None) -> list[str]:
    if path is None:
        return list(DEFAULT_TEMPLATES)
    templates = read_lines(path, "--templates")
    bad = [t for t in templates if "{}" not in t and "{c}" not in t]
    if bad:
        raise DriverError(f"--templates {path}: every template needs '{{}}' (or '{{c}}') for the class "
                          f"name; these do not: {bad[:3]}")
    return templates


def folder_classes(root: str, flag: str) -> list[str]:
    """The sorted sub-folder names of an image folder (its classes)."""
    if not os.path.isdir(root):
        raise DriverError(f"{flag} {root}: not a folder")
    classes = sorted(d.name for d in os.scandir(root) if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise DriverError(f"{flag} {root}: no class sub-folders (expected one sub-folder per class)")
    return classes


def scan_folder(root: str, flag: str, class_index: dict[str, int]) -> tuple[list[str], list[int]]:
    """The image files of an image folder and their class indices (by sub-folder name)."""
    classes = folder_classes(root, flag)
    unknown = [c for c in classes if c not in class_index]
    if unknown:
        raise DriverError(f"{flag} {root}: sub-folders {unknown[:5]} are not training classes "
                          f"(known: {list(class_index)[:10]}...); evaluation folders must share the "
                          "training class names")
    paths, labels = [], []
    for c in classes:
        for dirpath, _, files in sorted(os.walk(os.path.join(root, c))):
            for fname in sorted(files):
                if fname.lower().endswith(IMAGE_EXTENSIONS):
                    paths.append(os.path.join(dirpath, fname))
                    labels.append(class_index[c])
    if not paths:
        raise DriverError(f"{flag} {root}: the folder holds no image files ({', '.join(IMAGE_EXTENSIONS)})")
    return paths, labels


@dataclass
class CsvColumns:
    img_key: str = "filepath"
    caption_key: str = "title"
    label_key: str | None = None
    separator: str = "\t"


def read_csv(path: str, flag: str, cols: CsvColumns) -> tuple[list[str], list[str], list[str] | None]:
    """Image paths (relative ones resolved against the CSV's folder), captions, raw labels."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f, delimiter=cols.separator))
    except OSError as e:
        raise DriverError(f"{flag} {path}: cannot read it: {e}") from e
    if not rows:
        raise DriverError(f"{flag} {path}: the CSV has no rows")
    header = list(rows[0].keys())
    for key, what in ((cols.img_key, "--csv-img-key"), (cols.caption_key, "--csv-caption-key"),
                      (cols.label_key, "--csv-label-key")):
        if key is not None and key not in header:
            raise DriverError(f"{flag} {path}: no column {key!r} ({what}); the columns are {header} "
                              f"(separator {cols.separator!r}, --csv-separator)")
    base = os.path.dirname(os.path.abspath(path))
    paths = [r[cols.img_key] if os.path.isabs(r[cols.img_key]) else os.path.join(base, r[cols.img_key])
             for r in rows]
    missing = [p for p in paths if not os.path.exists(p)]
    if missing:
        raise DriverError(f"{flag} {path}: {len(missing)} image path(s) do not exist, e.g. {missing[:3]}")
    captions = [r[cols.caption_key] for r in rows]
    labels = [r[cols.label_key] for r in rows] if cols.label_key else None
    return paths, captions, labels


@dataclass
class TrainSource:
    """The fine-tuning data and its class names."""

    dataset: ImageSet
    classnames: list[str]
    folder_names: list[str] = field(default_factory=list)
    skipped: int = 0


def csv_label_index(raw: list[str], names: list[str], flag: str) -> list[int]:
    """Map CSV labels (class names or integer indices) to class indices."""
    index = {n: i for i, n in enumerate(names)}
    out = []
    for v in raw:
        if v in index:
            out.append(index[v])
        elif v.strip().lstrip("-").isdigit() and 0 <= int(v) < len(names):
            out.append(int(v))
        else:
            raise DriverError(f"{flag}: label {v!r} is neither a class name nor an index < {len(names)}")
    return out


def load_train_source(path: str, cols: CsvColumns, classnames_file: str | None,
                      transform: Callable) -> TrainSource:
    """The training data: an image folder or a CSV (see --train-data)."""
    flag = "--train-data"
    if os.path.isdir(path):
        folders = folder_classes(path, flag)
        names = [f.replace("_", " ") for f in folders]
        if classnames_file is not None:
            names = read_lines(classnames_file, "--classnames")
            if len(names) != len(folders):
                raise DriverError(f"--classnames {classnames_file}: {len(names)} names for {len(folders)} "
                                  f"class sub-folders of {path}; give one name per sub-folder, in sorted order")
        paths, labels = scan_folder(path, flag, {f: i for i, f in enumerate(folders)})
        paths, labels, skipped = _drop_unreadable(flag, paths, labels, decode=False)
        if not paths:
            raise DriverError(f"{flag} {path}: none of the images is readable")
        return TrainSource(FileImageSet(paths, labels, None, transform), names, folders, skipped)
    paths, captions, raw = read_csv(path, flag, cols)
    paths, captions, raw, skipped = _drop_unreadable(flag, paths, captions, raw, decode=False)
    if not paths:
        raise DriverError(f"{flag} {path}: none of the images is readable")
    if raw is None:
        names = read_lines(classnames_file, "--classnames") if classnames_file else []
        labels = [-1] * len(paths)
    else:
        names = read_lines(classnames_file, "--classnames") if classnames_file else sorted(set(raw))
        labels = csv_label_index(raw, names, flag)
    return TrainSource(FileImageSet(paths, labels, captions, transform), names, names, skipped)


def load_eval_set(name: str, path: str, train: TrainSource, cols: CsvColumns,
                  transform: Callable) -> ImageSet:
    """An evaluation set sharing the training classes (folder) or a CSV (captions, labels)."""
    flag = f"--eval-data {name}"
    if os.path.isdir(path):
        if not train.classnames:
            raise DriverError(f"{flag}: an image-folder evaluation set needs the class names: an image-folder "
                              "--train-data, CSV labels (--csv-label-key) or --classnames")
        index = {}  # a sub-folder may be named as a training sub-folder or as a class name (' ' or '_')
        for i, name in enumerate(train.classnames):
            index[name] = index[name.replace(" ", "_")] = i
        for i, name in enumerate(train.folder_names):
            index[name] = i
        paths, labels = scan_folder(path, flag, index)
        paths, labels, _ = _drop_unreadable(flag, paths, labels)
        if not paths:
            raise DriverError(f"{flag} {path}: none of the images is readable")
        return FileImageSet(paths, labels, None, transform)
    paths, captions, raw = read_csv(path, flag, cols)
    paths, captions, raw, _ = _drop_unreadable(flag, paths, captions, raw)
    if not paths:
        raise DriverError(f"{flag} {path}: none of the images is readable")
    labels = csv_label_index(raw, train.classnames, flag) if raw is not None else [-1] * len(paths)
    return FileImageSet(paths, labels, captions, transform)


def load_zeroshot_set(name: str, path: str, transform: Callable) -> tuple[ImageSet, list[str]]:
    """A zero-shot task: an image folder whose sub-folder names are its class names."""
    flag = f"--zeroshot-data {name}"
    folders = folder_classes(path, flag)
    paths, labels = scan_folder(path, flag, {f: i for i, f in enumerate(folders)})
    paths, labels, _ = _drop_unreadable(flag, paths, labels)
    if not paths:
        raise DriverError(f"{flag} {path}: none of the images is readable")
    return FileImageSet(paths, labels, None, transform), [f.replace("_", " ") for f in folders]


@dataclass
class EvalSet:
    """One evaluation set: role 'id' (in-distribution), 'ood' (shifted) or 'zeroshot' (own classes)."""

    name: str
    role: str
    dataset: ImageSet
    classnames: list[str]


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A seed for one sample of one epoch: augmentation and prompt choice do not depend on the batch
    layout, the number of processes, or where a run was resumed."""
    return (seed * 1_000_003 + epoch * 7_919 + index * 104_729) % (2**63 - 1)


class TrainView(Dataset):
    """Training samples keyed by (epoch, index): the image (augmented under a per-sample seed), its
    label, its caption (the data's own, or a prompt from a random template and its class name),
    and the paths of the images skipped for it. An image that fails to decode is replaced by the
    next index that decodes (deterministic, so a resumed or distributed run draws the same)."""

    def __init__(self, dataset: ImageSet, classnames: list[str], templates: list[str], seed: int):
        self.dataset, self.classnames, self.templates, self.seed = dataset, classnames, templates, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def _image(self, epoch: int, i: int) -> torch.Tensor:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(sample_seed(self.seed, epoch, i))
            return self.dataset.image(i)

    def __getitem__(self, key: tuple[int, int]):
        epoch, i = key
        n, skipped = len(self.dataset), []
        for k in range(n):
            j = (i + k) % n
            try:
                img = self._image(epoch, j)
                break
            except UnreadableImageError as e:
                skipped.append(e.path)
        else:
            raise DriverError(f"none of the {n} training images can be decoded (e.g. {skipped[:3]})")
        label = self.dataset.labels[j]
        if self.dataset.captions is not None:
            caption = self.dataset.captions[j]
        else:
            s = sample_seed(self.seed, epoch, j)
            template = self.templates[random.Random(s).randrange(len(self.templates))]
            caption = fill_template(template, self.classnames[label])
        return img, label, caption, tuple(skipped)


def epoch_batches(n: int, batch_size: int, epoch: int, seed: int, rank: int, world: int) -> list[list]:
    """This process's batches of an epoch: one shuffled order shared by all processes (seed, epoch),
    global batches of batch_size * world consecutive samples, each process taking its share
    interleaved (as DistributedSampler); the incomplete last global batch is dropped."""
    g = torch.Generator().manual_seed(seed * 10_007 + epoch)
    order = torch.randperm(n, generator=g).tolist()
    global_batch = batch_size * world
    batches = []
    for start in range(0, n - global_batch + 1, global_batch):
        chunk = order[start:start + global_batch]
        batches.append([(epoch, i) for i in chunk[rank::world]])
    return batches
