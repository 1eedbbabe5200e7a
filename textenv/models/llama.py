"""The Llama family's trunk for the lean paths (`textenv.models.lean`): Llama 2/3.x, SmolLM2, Qwen2/2.5 (qkv bias),
Qwen3 (RMSNorm on each query and key head) and Mistral (without a sliding window inside its context), as causal
LMs and as sequence classifiers (reward and value models).

One block (`Layer.__call__`): pre-RMSNorm attention with rotary positions and grouped-query heads, then a SwiGLU
MLP. The rotary cos/sin come from the model's own rotary module at our positions, so every `rope_type` and
scaling the config names (linear, dynamic, YaRN, Llama 3's) is what the HF forward computes, by construction.
On packed weights (frozen models, decoding) the q, k and v projections are one matrix multiply, and so are the
gate and up projections: at a decode step's few rows a multiply costs its call more than its FLOPs.

`llama_fast_path` says where this is exact, plain LoRA layers included (`textenv.models.adapters`); anything else (a
sliding window that can bite, another activation, quantized layers swapped in, hooks) keeps its HF forward.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    MistralForCausalLM,
    MistralForSequenceClassification,
    PreTrainedModel,
    Qwen2ForCausalLM,
    Qwen2ForSequenceClassification,
    Qwen3ForCausalLM,
    Qwen3ForSequenceClassification,
)
from transformers.models.llama.modeling_llama import LlamaRMSNorm
from transformers.models.mistral.modeling_mistral import MistralRMSNorm
from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm
from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm

from textenv.models.adapters import lean_linear, linear_parts, merged, plain_type, resolve

# model class -> its RMSNorm class (all compute x / rms(x) * weight in float32)
NORMS = {LlamaForCausalLM: LlamaRMSNorm, LlamaForSequenceClassification: LlamaRMSNorm,
         Qwen2ForCausalLM: Qwen2RMSNorm, Qwen2ForSequenceClassification: Qwen2RMSNorm,
         Qwen3ForCausalLM: Qwen3RMSNorm, Qwen3ForSequenceClassification: Qwen3RMSNorm,
         MistralForCausalLM: MistralRMSNorm, MistralForSequenceClassification: MistralRMSNorm}
CAUSAL_LMS = (LlamaForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM, MistralForCausalLM)
QK_NORM = (Qwen3ForCausalLM, Qwen3ForSequenceClassification)


def llama_fast_path(model: PreTrainedModel) -> bool:
    """Whether the lean paths compute exactly what this model's HF forward computes: one of the `NORMS` classes,
    SiLU-gated MLPs, attention over the whole context (a Mistral or Qwen sliding window shorter than the context
    would mask what the lean path sees), no attention dropout, the family's own module types or plain LoRA layers on
    them (not, e.g., quantized layers) and no forward hooks anywhere."""
    norm = NORMS.get(type(model))
    if norm is None:
        return False
    c = model.config
    window = getattr(c, "sliding_window", None)  # Mistral's and Qwen's (None unless use_sliding_window); not Llama's
    if c.hidden_act != "silu" or (window is not None and window < c.max_position_embeddings):
        return False
    base = model.model
    head = resolve(model.lm_head if isinstance(model, CAUSAL_LMS) else model.score)
    expected = [(base.embed_tokens, nn.Embedding), (base.norm, norm), (head, nn.Linear)]
    for b in base.layers:
        a, m = b.self_attn, b.mlp
        expected += [(b.input_layernorm, norm), (b.post_attention_layernorm, norm)]
        expected += [(p, nn.Linear) for p in (a.q_proj, a.k_proj, a.v_proj, a.o_proj, m.gate_proj, m.up_proj,
                                              m.down_proj)]
        if isinstance(model, QK_NORM):
            expected += [(a.q_norm, norm), (a.k_norm, norm)]
        if a.attention_dropout != 0.0 or a.scaling != a.head_dim**-0.5:
            return False
    if any(plain_type(mod) is not t for mod, t in expected) or head.bias is not None:
        return False
    return not any(mod._forward_hooks or mod._forward_pre_hooks for mod in model.modules())


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on (N, heads, D) rows with (N, 1, D) cos/sin: x cos + rotate_half(x) sin, as HF's
    `apply_rotary_pos_emb` (the two halves of D are the pairs rotated together)."""
    x1, x2 = x.chunk(2, -1)
    return x * cos + torch.cat([-x2, x1], -1) * sin


def _fused(linear: Callable, projections: list[nn.Module], adapters: bool) -> tuple[Callable, list[int]]:
    """Projections of one input as one multiply on their (in, out) weights concatenated (adapters merged in), and
    each one's output width. A bias is None if none has one, zeros for those without."""
    parts = [linear_parts(p, adapters) for p in projections]
    weights = [merged(w, adapter) for w, _, adapter in parts]
    biases = [b for _, b, _ in parts]
    bias = None if all(b is None for b in biases) else torch.cat(
        [w.new_zeros(w.shape[1]) if b is None else b for w, b in zip(weights, biases)])
    return linear(torch.cat(weights, dim=1), bias), [w.shape[1] for w in weights]


class Layer:
    """One decoder block's weights as the lean paths call them. `linear(weight (in, out), bias)` makes each
    x @ W + b; `packed`: the weights stay fixed while used, so q/k/v and gate/up are one multiply each, on weights
    concatenated once (a concatenation is a copy, and the live parameters' gradients would not reach it), and a LoRA
    adapter is merged in; `adapters`: False reads the base alone (`AdapterOff`)."""

    def __init__(self, block: nn.Module, linear: Callable, packed: bool, qk_norm: bool, adapters: bool = True):
        a, m = block.self_attn, block.mlp
        self.ln_1, self.ln_2 = block.input_layernorm.weight, block.post_attention_layernorm.weight
        self.eps = block.input_layernorm.variance_epsilon
        self.n_head, self.n_kv_head = a.config.num_attention_heads, a.config.num_key_value_heads
        self.head_dim = a.head_dim
        self.q_norm, self.k_norm = (a.q_norm.weight, a.k_norm.weight) if qk_norm else (None, None)
        self.packed = packed
        if packed:
            self.qkv, self.sizes = _fused(linear, [a.q_proj, a.k_proj, a.v_proj], adapters)  # (E, (H + 2 Hkv) D)
            self.gate_up, _ = _fused(linear, [m.gate_proj, m.up_proj], adapters)  # (E, 2 I)
        else:
            self.q, self.k, self.v, self.gate, self.up = (lean_linear(linear, p, packed, adapters) for p in
                                                          (a.q_proj, a.k_proj, a.v_proj, m.gate_proj, m.up_proj))
        self.o = lean_linear(linear, a.o_proj, packed, adapters)
        self.down = lean_linear(linear, m.down_proj, packed, adapters)

    def __call__(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], attend: Callable) -> torch.Tensor:
        """The block on token rows x (N, E) with their rotary `rope` = (cos, sin), each (N, 1, D):
        x + attn(norm_1(x)), then + down(silu(gate(h)) * up(h)) with h = norm_2(x).

        `attend(q (N, H, D), k (N, Hkv, D), v (N, Hkv, D), x (N, E)) -> (a (M, H*D), x (M, E))` is the attention:
        its output for the rows that go on and their residual stream (M < N in a last block that keeps only the
        positions that are read)."""
        N, E = x.shape
        D = self.head_dim
        h = F.rms_norm(x, (E,), self.ln_1, self.eps)
        q, k, v = self.qkv(h).split(self.sizes, -1) if self.packed else (self.q(h), self.k(h), self.v(h))
        q, k, v = q.view(N, self.n_head, D), k.view(N, self.n_kv_head, D), v.view(N, self.n_kv_head, D)
        if self.q_norm is not None:  # Qwen3: RMSNorm over each head's D, before the rotation
            q, k = F.rms_norm(q, (D,), self.q_norm, self.eps), F.rms_norm(k, (D,), self.k_norm, self.eps)
        cos, sin = rope
        a, x = attend(rotate(q, cos, sin), rotate(k, cos, sin), v, x)
        x = x + self.o(a)
        h = F.rms_norm(x, (E,), self.ln_2, self.eps)
        gate, up = self.gate_up(h).chunk(2, -1) if self.packed else (self.gate(h), self.up(h))
        return x + self.down(F.silu(gate) * up)


class LlamaTrunk:
    """A Llama-family model's pieces as the lean paths call them (see `textenv.models.lean`)."""

    def __init__(self, model: PreTrainedModel, linear: Callable, packed: bool, adapters: bool = True):
        c, base = model.config, model.model
        self.embed_tokens, self.rotary, self.final = base.embed_tokens, base.rotary_emb, base.norm
        self.n_head, self.n_kv_head = c.num_attention_heads, c.num_key_value_heads
        self.head_dim = base.layers[0].self_attn.head_dim
        self.max_positions = c.max_position_embeddings
        self.layers = [Layer(b, linear, packed, isinstance(model, QK_NORM), adapters) for b in base.layers]
        head = model.lm_head if self.is_causal_lm(model) else model.score  # nn.Linear, no bias
        self.head = lean_linear(linear, head, packed, adapters)  # (E, V or num_labels) as x @ W; tied or not

    @staticmethod
    def is_causal_lm(model: PreTrainedModel) -> bool:
        return isinstance(model, CAUSAL_LMS)

    def embed(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)  # (..., E); positions enter as the rotation

    def rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N,) positions -> cos, sin, each (N, 1, D), from the model's rotary module (its scaling included)."""
        cos, sin = self.rotary(self.embed_tokens.weight, positions[None])  # (1, N, D) each
        return cos[0, :, None], sin[0, :, None]

    def norm(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.final.weight, self.final.variance_epsilon)
