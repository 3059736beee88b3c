"""Evaluation: top-1 accuracy, ECE (15 bins), alignment / uniformity of the embeddings
(docs/maths.md, section 8), RSA between pre-trained and fine-tuned image embeddings (section 4),
and image-text retrieval R@1/5/10 when a set has captions."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from .data import EvalSet, ImageSet, fill_template
from .models import TrainModule


def _stack_images(items) -> torch.Tensor:
    return torch.stack([it[0] for it in items])


@torch.no_grad()
def encode_images(clip, dataset: ImageSet, batch_size: int, device: torch.device,
                  workers: int = 0, precision: str = "fp32") -> torch.Tensor:
    """Normalised float32 image features of a whole set, in order (the encoder under autocast
    for --precision bf16/fp16)."""
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
                        collate_fn=_stack_images)
    feats = []
    for x in loader:
        with _autocast(device, precision):
            f = clip.encode_image(x.to(device))
        feats.append(F.normalize(f.float(), dim=-1).cpu())
    return torch.cat(feats)


def _autocast(device: torch.device, precision: str):
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


@torch.no_grad()
def encode_texts(clip, tokenizer, texts: list[str], device: torch.device, batch_size: int = 256) -> torch.Tensor:
    out = [F.normalize(clip.encode_text(tokenizer(texts[i:i + batch_size]).to(device)).float(), dim=-1)
           for i in range(0, len(texts), batch_size)]
    return torch.cat(out).cpu()


@torch.no_grad()
def class_embeddings(clip, tokenizer, classnames: list[str], templates: list[str],
                     device: torch.device) -> torch.Tensor:
    """[C, D] zero-shot classifier: per class the normalised mean of its normalised template embeddings."""
    texts = [fill_template(t, c) for c in classnames for t in templates]
    emb = encode_texts(clip, tokenizer, texts, device).view(len(classnames), len(templates), -1)
    return F.normalize(emb.mean(1), dim=-1)


def expected_calibration_error(logits: torch.Tensor, labels: torch.Tensor, bins: int = 15) -> float:
    """ECE with `bins` equal-width confidence bins: sum_b |B_b|/N |acc(B_b) - conf(B_b)|."""
    probs = logits.float().softmax(-1)
    conf, pred = probs.max(-1)
    correct = (pred == labels).float()
    edges = torch.linspace(0, 1, bins + 1)
    ece = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        mask = (conf > lo) & (conf <= hi)
        if mask.any():
            ece += mask.float().mean().item() * abs(correct[mask].mean().item() - conf[mask].mean().item())
    return ece


def alignment(image: torch.Tensor, text: torch.Tensor) -> float:
    """mean_i |I_i - T_i|^2 over paired rows."""
    return (image - text).pow(2).sum(-1).mean().item()


def uniformity(image: torch.Tensor, text: torch.Tensor) -> float:
    """log mean_{i<j} exp(-2 |x_i - x_j|^2) over the image and text rows together."""
    x = torch.cat([image, text]).double()
    sq = torch.cdist(x, x).pow(2)
    iu = torch.triu_indices(len(x), len(x), offset=1)
    return torch.logsumexp(-2 * sq[iu[0], iu[1]], 0).item() - math.log(iu.shape[1])


def rsa(pre: torch.Tensor, post: torch.Tensor) -> float:
    """Pearson correlation of the upper triangles of the cosine-similarity matrices of the
    pre-trained and fine-tuned embeddings of the same inputs (1 = geometry preserved)."""
    iu = torch.triu_indices(len(pre), len(pre), offset=1)
    a = (pre.double() @ pre.double().T)[iu[0], iu[1]]
    b = (post.double() @ post.double().T)[iu[0], iu[1]]
    a, b = a - a.mean(), b - b.mean()
    denom = a.norm() * b.norm()
    return float((a @ b) / denom) if denom > 0 else float("nan")


def retrieval(image: torch.Tensor, text: torch.Tensor, ks=(1, 5, 10)) -> dict[str, float]:
    """Recall@K of image->text and text->image retrieval; row i's match is column i."""
    sims = image @ text.T
    out = {}
    for name, s in (("i2t", sims), ("t2i", sims.T)):
        target = s.diagonal().unsqueeze(1)
        rank = (s > target).sum(1)  # how many candidates score strictly higher than the match
        for k in ks:
            out[f"{name}_r{k}"] = (rank < k).float().mean().item()
    return out


def _subset(n: int, m: int) -> torch.Tensor:
    return torch.arange(n) if n <= m else torch.linspace(0, n - 1, m).round().long()


@torch.no_grad()
def evaluate(module: TrainModule, sets: list[EvalSet], tokenizer, templates: list[str],
             pre_features: dict[str, torch.Tensor], device: torch.device, batch_size: int,
             metric_max_images: int, workers: int = 0, precision: str = "fp32") -> list[dict]:
    """One row of metrics per evaluation set. Sets of role id/ood use the method's head when it has
    one (ft), else the zero-shot classifier built from the model's own text tower; zero-shot sets
    always use their own class names' prompts. `pre_features` are the pre-trained image features
    of each set (for RSA)."""
    module.eval()
    clip = module.clip
    scale = float(clip.logit_scale.exp())
    rows = []
    for es in sets:
        ds = es.dataset
        img = encode_images(clip, ds, batch_size, device, workers, precision)
        row: dict = {"eval_set": es.name, "role": es.role, "n": len(ds)}
        sub = _subset(len(img), metric_max_images)
        paired_text = None
        if ds.has_labels:
            labels = torch.tensor(ds.labels)
            weights = class_embeddings(clip, tokenizer, es.classnames, templates, device)
            if module.head is not None and es.role != "zeroshot":
                logits = module.head(img.to(device)).float().cpu()
            else:
                logits = scale * img @ weights.T
            row["top1"] = (logits.argmax(-1) == labels).float().mean().item()
            row["ece"] = expected_calibration_error(logits, labels)
            paired_text = weights[labels]
        if ds.has_captions:
            captions = encode_texts(clip, tokenizer, list(ds.captions), device)
            row.update(retrieval(img, captions))
            paired_text = captions
        if paired_text is not None:
            row["alignment"] = alignment(img, paired_text)
            row["uniformity"] = uniformity(img[sub], paired_text[sub])
        if es.name in pre_features:
            row["rsa"] = rsa(pre_features[es.name][sub], img[sub])
        rows.append(row)
    return rows
