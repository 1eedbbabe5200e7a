"""GPT-2's trunk for the lean paths (`textenv.models.lean`): its blocks as one function over token rows, its learned
position embeddings, its final layer norm and head, over the HF model's own weights.

`gpt2_fast_path` says where this is exact: a plain `GPT2LMHeadModel` or `GPT2ForSequenceClassification`, or one
with plain LoRA layers (`textenv.models.adapters`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GPT2ForSequenceClassification, GPT2LMHeadModel, PreTrainedModel
from transformers.pytorch_utils import Conv1D

from textenv.models.adapters import lean_linear, plain_type, resolve

# GPT-2 activations the lean path implements ("gelu_new" is GELU's tanh approximation)
_GELU = {"gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu": "none"}

def gpt2_fast_path(model: PreTrainedModel) -> bool:
    """Whether the lean paths compute exactly what this model's HF forward computes: a `GPT2LMHeadModel` or
    `GPT2ForSequenceClassification` with a plain GPT-2 config, its own module types or plain LoRA layers on them
    (not, e.g., quantized layers swapped in) and no forward hooks anywhere (a hook may edit what the forward
    returns; the lean path would skip it)."""
    if type(model) not in (GPT2LMHeadModel, GPT2ForSequenceClassification):
        return False
    c = model.config
    if not (c.activation_function in _GELU and c.scale_attn_weights and not c.scale_attn_by_inverse_layer_idx
            and not c.add_cross_attention):
        return False
    tr = model.transformer
    head = resolve(model.lm_head if type(model) is GPT2LMHeadModel else model.score)
    expected = [(tr.wte, nn.Embedding), (tr.wpe, nn.Embedding), (tr.ln_f, nn.LayerNorm), (head, nn.Linear)]
    for b in tr.h:
        expected += [(b.ln_1, nn.LayerNorm), (b.ln_2, nn.LayerNorm), (b.attn.c_attn, Conv1D), (b.attn.c_proj, Conv1D),
                     (b.mlp.c_fc, Conv1D), (b.mlp.c_proj, Conv1D)]
    if any(plain_type(m) is not t for m, t in expected) or head.bias is not None:
        return False
    return not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


# ---------------------------------------------------------------------------------------------------- the block


class Layer(NamedTuple):
    """One pre-LN GPT-2 block's weights: its layer norms and four x @ W + b (fc applies the GELU)."""

    ln_1: nn.LayerNorm
    ln_2: nn.LayerNorm
    qkv: Callable  # (N, E) -> (N, 3E)
    proj: Callable  # (N, E) -> (N, E)
    fc: Callable  # (N, E) -> (N, 4E), GELU included
    fc_proj: Callable  # (N, 4E) -> (N, E)
    n_head: int
    eps: float

    def __call__(self, x: torch.Tensor, rope: None, attend: Callable) -> torch.Tensor:
        """The block on token rows x (N, E): x + attn(ln_1(x)), then + mlp(ln_2(x)).

        `attend(q (N, H, D), k, v, x (N, E)) -> (a (M, E), x (M, E))` is the attention: its output for the rows that
        go on and their residual stream. M = N, except in a last block that keeps only the positions that are read.
        GPT-2's positions are in its embedding: `rope` is None."""
        N, E = x.shape
        h = F.layer_norm(x, (E,), self.ln_1.weight, self.ln_1.bias, self.eps)
        q, k, v = self.qkv(h).view(N, 3, self.n_head, -1).unbind(1)  # each (N, H, D)
        a, x = attend(q, k, v, x)
        x = x + self.proj(a)
        h = F.layer_norm(x, (E,), self.ln_2.weight, self.ln_2.bias, self.eps)
        return x + self.fc_proj(self.fc(h))


class GPT2Trunk:
    """A GPT-2 model's pieces as the lean paths call them (see `textenv.models.lean`). `linear(weight (in, out),
    bias, gelu=None)` makes each x @ W + b. `packed`: the weights stay fixed while used (GPT-2's projections are
    fused already; a LoRA adapter is merged in); `adapters`: False reads the base alone (`AdapterOff`)."""

    def __init__(self, model: GPT2LMHeadModel | GPT2ForSequenceClassification, linear: Callable, packed: bool,
                 adapters: bool = True):
        c = model.config
        self.transformer, self.eps = model.transformer, c.layer_norm_epsilon
        self.n_head = self.n_kv_head = c.n_head
        self.head_dim = c.n_embd // c.n_head
        self.max_positions = c.n_positions
        gelu = _GELU[c.activation_function]
        make = lambda module, gelu=None: lean_linear(linear, module, packed, adapters, gelu)  # noqa: E731
        self.layers = [Layer(b.ln_1, b.ln_2, make(b.attn.c_attn), make(b.attn.c_proj), make(b.mlp.c_fc, gelu),
                             make(b.mlp.c_proj), c.n_head, self.eps)
                       for b in model.transformer.h]
        self.head = make(model.lm_head if self.is_causal_lm(model) else model.score)  # (E, V or num_labels), no bias

    @staticmethod
    def is_causal_lm(model: PreTrainedModel) -> bool:
        return type(model) is GPT2LMHeadModel

    def embed(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.transformer.wte(input_ids) + self.transformer.wpe(positions)  # (..., E)

    def rope(self, positions: torch.Tensor) -> None:
        return None  # positions are in the embedding

    def norm(self, x: torch.Tensor) -> torch.Tensor:
        ln_f = self.transformer.ln_f
        return F.layer_norm(x, (x.shape[-1],), ln_f.weight, ln_f.bias, self.eps)
