"""LipsumLoss: the Lipsum-FT regulariser (docs/maths.md, section 5) as a module over lipsum_loss,
with the random texts the function leaves to the caller (drawn from an open_clip tokenizer's
vocabulary and encoded by the frozen pre-trained model)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .._validation import Scalar, check_positive_int, check_weight
from ..ops.lipsum import lipsum_loss


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
        self.num_texts = check_positive_int(num_texts, "num_texts")
        self.text_length = check_positive_int(text_length, "text_length")
        self.backend = backend

    def extra_repr(self) -> str:
        return f"weight={self.weight}, num_texts={self.num_texts}, text_length={self.text_length}"

    def forward(self, image_ft: torch.Tensor, image_pre: torch.Tensor,
                random_text_features: torch.Tensor, logit_scale: Scalar) -> torch.Tensor:
        return self.weight * lipsum_loss(image_ft, image_pre, random_text_features,
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
