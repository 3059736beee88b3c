"""DiVELoss and LipsumLoss: the DiVE and Lipsum-FT regularisers (docs/maths.md, sections 4-5) as
modules over robustft_ext.dive_loss / dive_terms / lipsum_loss, with the state and the random
texts the functions leave to the caller (DiVE's centre, Lipsum-FT's random token sequences)."""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from . import functional
from ._validation import (acc_dtype, check_features, check_same_batch, check_same_device,
                          check_same_dim, check_weight)
from .functional import Scalar

_DIVE_NAMES = ("image_ft", "text_ft", "image_pre", "text_pre")
CENTER_MODES = ("ema", "batch")


def _positive_int(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def _world_size() -> int:
    """torch.distributed's world size when a process group is initialised, else 1."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def _mean_across_ranks(x: torch.Tensor) -> torch.Tensor:
    """x averaged over the ranks of the default process group (x itself on one process)."""
    world = _world_size()
    if world > 1:
        x = x.contiguous()
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
        x = x / world
    return x


class DiVELoss(nn.Module):
    """DiVE, difference vector equalisation (docs/maths.md, section 4), as a training objective.

    forward(image_ft, text_ft, image_pre, text_pre, output_dict=False) takes [B', D] features of
    the reference pairs from the encoders being fine-tuned and from the frozen pre-trained ones
    and returns weight * (AVL + PVL), or with output_dict=True {"dive_avl_loss": weight * AVL,
    "dive_pvl_loss": weight * PVL}. Gradients reach image_ft and text_ft only.

    The centre m of the difference vectors u_j = image_ft_j - image_pre_j, v_j = text_ft_j -
    text_pre_j is the buffer `center` (saved in state_dict; zero at the start):
    - center_mode="ema": the loss uses the current m; after the forward, in training mode only,
      m <- momentum * m + (1 - momentum) * mean_j (u_j + v_j) / 2.
    - center_mode="batch": the loss uses m = mean_j (u_j + v_j) / 2 of this batch (detached),
      which the buffer then holds (in training mode).
    Under torch.distributed (initialised, world size > 1) the batch mean is averaged over the
    ranks first (every rank must call forward), so all ranks hold the same m: that of the
    concatenated batch when the ranks' batches have equal sizes.
    dim=None sizes the centre at the first forward (float64 for float64 features, else float32,
    on the features' device); load_state_dict into such a fresh module adopts a saved centre's
    size and dtype. With dim given, the centre is a float32 zero buffer that follows .to() /
    .double() as any buffer does; the loss uses m in float32 (float64 for float64 features).
    """

    def __init__(self, weight: float = 1000.0, momentum: float = 0.99, center_mode: str = "ema",
                 dim: int | None = None, backend: str | None = None) -> None:
        super().__init__()
        self.weight = check_weight(weight, "weight")
        if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) \
                or not math.isfinite(momentum) or not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be a float in [0, 1), got {momentum!r}")
        self.momentum = float(momentum)
        if center_mode not in CENTER_MODES:
            raise ValueError(f"center_mode must be one of {CENTER_MODES}, got {center_mode!r}")
        self.center_mode = center_mode
        if dim is not None:
            _positive_int(dim, "dim")
        self.dim = dim
        self.backend = backend
        # An empty centre means "not sized yet" (dim=None before the first forward or load).
        self.register_buffer("center", torch.zeros(0 if dim is None else dim))

    def extra_repr(self) -> str:
        return (f"weight={self.weight}, momentum={self.momentum}, "
                f"center_mode={self.center_mode!r}, dim={self.dim}")

    @property
    def initialized(self) -> bool:
        """Whether the centre has its size (dim given, a forward done, or a centre loaded)."""
        return self.center.numel() > 0

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        key = prefix + "center"
        saved = state_dict.get(key)
        if (isinstance(saved, torch.Tensor) and not self.initialized and saved.dim() == 1
                and saved.numel() > 0):
            if self.dim is not None and saved.numel() != self.dim:
                error_msgs.append(f"size mismatch for {key}: DiVELoss(dim={self.dim}) cannot "
                                  f"load a centre of size {saved.numel()}")
                return
            # A fresh lazy module: adopt the saved centre's size and dtype, keep our device.
            self.center = torch.empty(saved.shape, dtype=saved.dtype, device=self.center.device)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def _check_inputs(self, tensors: tuple[object, ...]) -> tuple[torch.Tensor, ...]:
        xs = tuple(check_features(t, n) for t, n in zip(tensors, _DIVE_NAMES))
        for x, name in zip(xs[1:], _DIVE_NAMES[1:]):
            check_same_dim(xs[0], x, _DIVE_NAMES[0], name)
            check_same_batch(xs[0], x, _DIVE_NAMES[0], name)
        device = check_same_device(dict(zip(_DIVE_NAMES, xs)))
        d = xs[0].shape[1]
        if self.dim is not None and d != self.dim:
            raise ValueError(f"DiVELoss(dim={self.dim}) got features of dim {d}")
        if self.initialized:
            if self.center.numel() != d:
                raise ValueError(f"DiVELoss.center has size {self.center.numel()} (from dim, an "
                                 f"earlier forward or a loaded state_dict) but the features "
                                 f"have dim {d}")
            if self.center.device != device:
                raise ValueError(f"DiVELoss.center is on {self.center.device} but the features "
                                 f"are on {device}: move the module with .to({str(device)!r})")
        return xs

    def center_for_loss(self, image_ft: torch.Tensor, text_ft: torch.Tensor,
                        image_pre: torch.Tensor, text_pre: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(m for this step's loss, the batch centre or None) for checked inputs.

        "ema": a copy of the buffer (it is updated in place after the step, and a backend may
        keep its input for the backward), sizing it at the first call. "batch": the detached
        batch mean of (u + v) / 2, averaged across ranks, returned twice.
        """
        xs = (image_ft, text_ft, image_pre, text_pre)
        dtype = xs[0].dtype
        for x in xs[1:]:
            dtype = torch.promote_types(dtype, x.dtype)
        acc = acc_dtype(dtype)
        if not self.initialized:
            self.center = torch.zeros(xs[0].shape[1], dtype=acc, device=xs[0].device)
        if self.center_mode == "batch":
            with torch.no_grad():
                u = xs[0].detach().to(acc) - xs[2].detach().to(acc)
                v = xs[1].detach().to(acc) - xs[3].detach().to(acc)
                center = _mean_across_ranks(((u + v) / 2).mean(0))
            return center, center
        return self.center.detach().clone(), None

    def update_center(self, diff_mean: torch.Tensor | None, batch_center: torch.Tensor | None) -> None:
        """After a training step: m <- momentum m + (1 - momentum) mean_ranks(diff_mean) ("ema"),
        or m <- the batch centre ("batch"). Nothing in eval mode."""
        if not self.training:
            return
        with torch.no_grad():
            if self.center_mode == "batch":
                self.center.copy_(batch_center)
                return
            diff_mean = _mean_across_ranks(diff_mean.detach().to(self.center.dtype))
            self.center.copy_(self.momentum * self.center + (1.0 - self.momentum) * diff_mean)

    def forward(self, image_ft: torch.Tensor, text_ft: torch.Tensor, image_pre: torch.Tensor,
                text_pre: torch.Tensor, output_dict: bool = False
                ) -> torch.Tensor | dict[str, torch.Tensor]:
        xs = self._check_inputs((image_ft, text_ft, image_pre, text_pre))
        center, batch_center = self.center_for_loss(*xs)
        if self.training and self.center_mode == "ema":
            avl, pvl, diff_mean = functional.dive_terms(*xs, center, backend=self.backend)
        else:
            avl, pvl = functional.dive_loss(*xs, center, backend=self.backend)
            diff_mean = None
        self.update_center(diff_mean, batch_center)
        if output_dict:
            return {"dive_avl_loss": self.weight * avl, "dive_pvl_loss": self.weight * pvl}
        return self.weight * (avl + pvl)


def _tokenizer_spec(tokenizer: object) -> tuple[int, int | None, int, int, list[int]]:
    """(vocab_size, start id or None, end id, pad id, special ids) of an open_clip tokenizer."""
    try:
        from open_clip.tokenizer import HFTokenizer, SimpleTokenizer
    except ImportError as exc:
        raise TypeError(f"tokenizer must be an open_clip SimpleTokenizer or HFTokenizer, got "
                        f"{type(tokenizer).__name__} (open_clip is not importable: {exc})") from exc
    if isinstance(tokenizer, SimpleTokenizer):
        special = [int(i) for i in tokenizer.all_special_ids]
        return len(tokenizer.encoder), int(tokenizer.sot_token_id), int(tokenizer.eot_token_id), \
            0, special
    if isinstance(tokenizer, HFTokenizer):
        hf = tokenizer.tokenizer

        def ident(name: str) -> int | None:
            value = getattr(hf, name, None)
            return None if value is None else int(value)

        start = ident("bos_token_id")
        if start is None:
            start = ident("cls_token_id")
        end = ident("eos_token_id")
        if end is None:
            end = ident("sep_token_id")
        if end is None:
            raise ValueError(f"the HF tokenizer {type(hf).__name__} has neither an eos nor a sep "
                             "token: no end token for the random texts")
        pad = ident("pad_token_id")
        special = [int(i) for i in (getattr(hf, "all_special_ids", None) or [])]
        special += [i for i in (start, end, pad) if i is not None]
        return int(hf.vocab_size), start, end, 0 if pad is None else pad, special
    raise TypeError(f"tokenizer must be an open_clip SimpleTokenizer or HFTokenizer "
                    f"(open_clip.get_tokenizer), got {type(tokenizer).__name__}")


class LipsumLoss(nn.Module):
    """Lipsum-FT's regulariser (docs/maths.md, section 5) as a module.

    forward(image_ft, image_pre, random_text_features, logit_scale) returns weight * R,
    R = |s0 (F - F0) G^T|_F^2 / (2 K B), with F = image_ft, F0 = image_pre [B, D], G =
    random_text_features [K, D] and s0 = logit_scale, the pre-trained model's logit scale
    multiplier (a constant). Gradients reach image_ft only. K is G's row count (num_texts is how
    many texts the helpers draw).

    random_tokens(tokenizer, ...) draws the K random texts; random_text_features(model,
    tokenizer, ...) encodes them with the frozen pre-trained model (G).
    """

    def __init__(self, weight: float = 1.0, num_texts: int = 80, text_length: int = 8,
                 backend: str | None = None) -> None:
        super().__init__()
        self.weight = check_weight(weight, "weight")
        self.num_texts = _positive_int(num_texts, "num_texts")
        self.text_length = _positive_int(text_length, "text_length")
        self.backend = backend

    def extra_repr(self) -> str:
        return f"weight={self.weight}, num_texts={self.num_texts}, text_length={self.text_length}"

    def forward(self, image_ft: torch.Tensor, image_pre: torch.Tensor,
                random_text_features: torch.Tensor, logit_scale: Scalar) -> torch.Tensor:
        return self.weight * functional.lipsum_loss(image_ft, image_pre, random_text_features,
                                                    logit_scale, backend=self.backend)

    def random_tokens(self, tokenizer: object, generator: torch.Generator | None = None,
                      device: torch.device | str | None = None) -> torch.Tensor:
        """[num_texts, context_length] int64 token ids: per row the start token, text_length ids
        drawn uniformly (with replacement) from the vocabulary less its special tokens, the end
        token, then the tokenizer's padding (0 for open_clip's BPE; the HF pad id, else 0).

        tokenizer: open_clip's SimpleTokenizer (start/end = its sot/eot ids) or HFTokenizer
        (start = bos, else cls, omitted when the HF tokenizer has neither; end = eos, else sep).
        Drawn from `generator` (torch's default when None) on its device, so a seeded generator
        reproduces the texts; returned on `device` (default: the generator's device).
        """
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        vocab_size, start, end, pad, special = _tokenizer_spec(tokenizer)
        context = getattr(tokenizer, "context_length", None)
        if isinstance(context, bool) or not isinstance(context, int) or context < 1:
            raise ValueError(f"the tokenizer has no usable context_length (got {context!r})")
        n_special = 1 if start is None else 2
        if self.text_length + n_special > context:
            raise ValueError(f"text_length={self.text_length} plus {n_special} start/end tokens "
                             f"exceeds the tokenizer's context length {context}")
        gen = generator if generator is not None else torch.default_generator
        excluded = sorted({i for i in special if 0 <= i < vocab_size})
        n_allowed = vocab_size - len(excluded)
        if n_allowed < 1:
            raise ValueError("the tokenizer's vocabulary has no non-special token")
        # The r-th allowed id for r uniform in [0, n_allowed): stepping over the excluded ids in
        # increasing order. For open_clip's BPE (special ids last) the id is r itself.
        ids = torch.randint(0, n_allowed, (self.num_texts, self.text_length),
                            generator=gen, device=gen.device)
        for e in excluded:
            ids += (ids >= e).long()
        tokens = torch.full((self.num_texts, context), pad, dtype=torch.long, device=gen.device)
        col = 0
        if start is not None:
            tokens[:, 0] = start
            col = 1
        tokens[:, col:col + self.text_length] = ids
        tokens[:, col + self.text_length] = end
        return tokens if device is None else tokens.to(device)

    def random_text_features(self, model: nn.Module, tokenizer: object,
                             generator: torch.Generator | None = None) -> torch.Tensor:
        """G: L2-normalised model.encode_text features [num_texts, D] of random_tokens(tokenizer,
        generator), under torch.no_grad() on the model's device. Pass the frozen pre-trained
        model, in eval mode (its mode is left as it is)."""
        if not callable(getattr(model, "encode_text", None)):
            raise TypeError(f"model must have an encode_text method (an open_clip model), got "
                            f"{type(model).__name__}")
        param = next(iter(model.parameters()), None)
        device = param.device if param is not None else torch.device("cpu")
        tokens = self.random_tokens(tokenizer, generator, device=device)
        with torch.no_grad():
            return F.normalize(model.encode_text(tokens), dim=-1)
