"""Models: build an open_clip model (a name, a config JSON, or the embedded tiny config), load local
weights with clear errors, the module that training runs (CLIP + optional classification head),
and the frozen pre-trained encoders that WiSE-FT, RSA, DiVE and Lipsum need."""
from __future__ import annotations

import copy
import difflib
import json
import logging
import os
import pickle
import tempfile

import open_clip
import torch
import torch.nn.functional as F
from torch import nn

from . import checkpoint
from .errors import CheckpointError, DriverError, excerpt
from .files import atomic_write_text

# The embedded default's model: a tiny ViT (32x32 images, 16 patches) with a 2-layer text tower.
# Kept as a Python dict (not a JSON data file) so that it ships with the package's code.
EMBEDDED_MODEL_NAME = "robustft-tiny-vit"
EMBEDDED_MODEL_CONFIG: dict = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


def register_config(name: str, config: dict, folder: str | None = None) -> str:
    """Register a model config with open_clip under `name` (writes <folder>/<name>.json)."""
    folder = folder or tempfile.mkdtemp(prefix="robustft_model_cfg_")
    path = os.path.join(folder, f"{name}.json")
    # atomic: the other processes of a distributed run may read it at the same time; a resumed
    # run finds the file as it was and leaves it alone
    atomic_write_text(path, json.dumps(config, indent=2), if_changed=True)
    open_clip.add_model_config(path)
    return name


def resolve_model_name(model: str | None, run_dir: str) -> str:
    """The open_clip name to build: the embedded config, a config JSON, or a built-in name."""
    if model is None:
        return register_config(EMBEDDED_MODEL_NAME, EMBEDDED_MODEL_CONFIG, run_dir)
    if model.endswith(".json"):
        try:
            with open(model) as f:
                config = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise DriverError(f"--model {model}: cannot read the model config JSON: {e}") from e
        config = config.get("model_cfg", config)
        missing = [k for k in ("embed_dim", "vision_cfg", "text_cfg") if k not in config]
        if missing:
            raise DriverError(f"--model {model}: not an open_clip model config (missing {missing})")
        name = os.path.splitext(os.path.basename(model))[0]
        return register_config(name, config, run_dir)
    known = open_clip.list_models()
    if model not in known and model.replace("/", "-") not in known:
        close = difflib.get_close_matches(model, known, n=5)
        raise DriverError(f"--model {model!r} is not an open_clip model name"
                          + (f"; did you mean one of {close}?" if close else
                             "; see open_clip.list_models(), or pass a model config JSON"))
    return model.replace("/", "-")


def build_clip(name: str, pretrained: str | None, device: torch.device) -> nn.Module:
    """Build the open_clip model `name` on `device`, with weights from the local file `pretrained`."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # open_clip warns that no pretrained tag was given: we load our own
    try:
        model = open_clip.create_model(name, pretrained=None, device="cpu")
    except Exception as e:  # open_clip raises RuntimeError/KeyError/TypeError for bad configs
        raise DriverError(f"--model {name}: open_clip cannot build it: {e}") from e
    finally:
        root.setLevel(level)
    if not hasattr(model, "encode_image") or not hasattr(model, "encode_text"):
        raise DriverError(f"--model {name}: not a CLIP-style model (no encode_image/encode_text)")
    if pretrained is not None:
        try:
            open_clip.load_checkpoint(model, pretrained, strict=True)
        except pickle.UnpicklingError as e:
            refused = checkpoint.refusal(pretrained)
            if refused is not None:
                raise CheckpointError(f"--pretrained {refused}") from None
            raise DriverError(f"--pretrained {pretrained}: not a readable weights file "
                              f"({excerpt(str(e)) or type(e).__name__})") from None
        except Exception as e:
            raise DriverError(f"--pretrained {pretrained}: the weights do not fit model {name}: "
                              f"{excerpt(str(e), 1200)}") from e
    return model.to(device)


def get_tokenizer(name: str):
    """open_clip's tokenizer for the model (its BPE vocabulary ships with open_clip: offline)."""
    return open_clip.get_tokenizer(name)


def preprocess_cfg(model: nn.Module) -> dict:
    return open_clip.get_model_preprocess_cfg(model)


class TrainModule(nn.Module):
    """What training runs (and DDP wraps): a CLIP model and, for cross-entropy fine-tuning, a linear
    classification head on the normalised image features, initialised from the zero-shot text
    embeddings times the logit scale (WiSE-FT's head).

    forward encodes the batch and any extra images/texts a method needs (DiVE's reference pairs) in
    one pass, so that every parameter's gradient goes through the DDP wrapper's forward.
    """

    def __init__(self, clip: nn.Module, head: nn.Linear | None = None):
        super().__init__()
        self.clip = clip
        self.head = head

    def forward(self, images: torch.Tensor, texts: torch.Tensor | None = None,
                extra_images: torch.Tensor | None = None,
                extra_texts: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        n = images.shape[0]
        all_images = images if extra_images is None else torch.cat([images, extra_images])
        img = F.normalize(self.clip.encode_image(all_images).float(), dim=-1)
        out = {"image_features": img[:n], "logit_scale": self.clip.logit_scale.exp().float().reshape(())}
        if extra_images is not None:
            out["extra_image_features"] = img[n:]
        if texts is not None or extra_texts is not None:
            parts = [t for t in (texts, extra_texts) if t is not None]
            txt = F.normalize(self.clip.encode_text(torch.cat(parts)).float(), dim=-1)
            k = 0
            if texts is not None:
                out["text_features"] = txt[:texts.shape[0]]
                k = texts.shape[0]
            if extra_texts is not None:
                out["extra_text_features"] = txt[k:]
        if self.head is not None:
            out["logits"] = self.head(out["image_features"])
        return out


def make_head(class_embeddings: torch.Tensor, logit_scale: float) -> nn.Linear:
    """A bias-free linear head with rows logit_scale * the normalised class text embeddings."""
    head = nn.Linear(class_embeddings.shape[1], class_embeddings.shape[0], bias=False)
    with torch.no_grad():
        head.weight.copy_(logit_scale * class_embeddings)
    return head.to(class_embeddings.device)


class FrozenEncoders:
    """The pre-trained (zero-shot) model kept frozen beside the one being fine-tuned: its features
    for RSA, DiVE (reference pairs) and Lipsum (random texts), and its weights for WiSE-FT."""

    def __init__(self, clip: nn.Module):
        self.clip = copy.deepcopy(clip).eval()
        for p in self.clip.parameters():
            p.requires_grad_(False)
        self.logit_scale = float(self.clip.logit_scale.exp())

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.clip.state_dict()

    @torch.no_grad()
    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.clip.encode_image(images).float(), dim=-1)

    @torch.no_grad()
    def text_features(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.clip.encode_text(tokens).float(), dim=-1)
