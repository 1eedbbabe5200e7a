"""Incremental decoding for the sampler: prefill a left-padded prompt batch once, then one token per step.

`make_decoder(model, ...)` picks one of two implementations with the same interface:

- `lean.LeanDecoder`, for GPT-2 models (the default and anchor models) and the Llama family (Llama, Qwen2/3,
  Mistral): the lean block over the model's own weights, oneDNN-prepacked, keys and values in buffers allocated
  once (see `textenv.models.lean`).
- `HFDecoder`, for every other causal LM: the model's own forward with its KV cache.

Both see the same tokens and positions: positions count real tokens only, so a left-padded prompt is encoded
as if unpadded. Dropout is not applied (rollouts are sampled with dropout off, as RLHF requires).
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from textenv.models.adapters import unwrap
from textenv.models.lean import LeanDecoder, fast_path
from textenv.models.tokens import position_ids_from_mask


class HFDecoder:
    """Any HF causal LM through its own forward and KV cache."""

    def __init__(self, model: PreTrainedModel, batch_size: int, max_len: int):
        self.model = model
        self.device = next(model.parameters()).device
        self.mask = torch.ones(batch_size, max_len, dtype=torch.long, device=self.device)  # (B, L) grows
        self.cache = None
        self.length = 0  # tokens in the cache so far
        self.next_position = None  # (B, 1)

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Encode (B, P) left-padded prompts; return the (B, V) logits of the first response token."""
        P = input_ids.shape[1]
        self.mask[:, :P] = attention_mask
        self.next_position = attention_mask.sum(-1, keepdim=True)  # (B, 1)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=True,
                         position_ids=position_ids_from_mask(attention_mask))
        self.cache, self.length = out.cache, P
        return out.logits[:, -1]

    def _reserve(self, slots: int) -> None:
        if slots > self.mask.shape[1]:  # doubling; new slots are real until a chunk marks them
            self.mask = torch.nn.functional.pad(self.mask, (0, max(slots, 2 * self.mask.shape[1]) - self.mask.shape[1]),
                                                value=1)

    def extend(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Append a chunk of (B, S) tokens, each row's real ones (mask 1) first; see `LeanDecoder.extend`."""
        B, S = tokens.shape
        start = self.length
        self._reserve(start + S)
        self.mask[:, start : start + S] = mask
        positions = self.next_position + position_ids_from_mask(mask)  # (B, S)
        out = self.model(input_ids=tokens, attention_mask=self.mask[:, : start + S], position_ids=positions,
                         cache=self.cache, use_cache=True)
        self.cache, self.length = out.cache, start + S
        self.next_position = self.next_position + mask.sum(-1, keepdim=True)
        last = (mask.sum(-1) - 1).clamp(min=0)  # (B,)
        return out.logits[torch.arange(B, device=tokens.device), last]

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Append (B,) tokens; return the (B, V) logits of the next one."""
        self._reserve(self.length + 1)
        out = self.model(input_ids=tokens[:, None], attention_mask=self.mask[:, : self.length + 1],
                         position_ids=self.next_position, cache=self.cache, use_cache=True)
        self.cache, self.length = out.cache, self.length + 1
        self.next_position = self.next_position + 1
        return out.logits[:, -1]


def make_decoder(model: PreTrainedModel, batch_size: int, max_len: int) -> LeanDecoder | HFDecoder:
    """The fastest decoder that is exact for `model` (see the module docstring)."""
    trunk = fast_path(model)  # a PEFT model's too: its LoRA adapters merged into the packed weights
    cls = LeanDecoder if trunk is not None and trunk.is_causal_lm(unwrap(model)[0]) else HFDecoder
    return cls(model, batch_size, max_len)
