"""A lean GPT-2 forward over an HF model's own weights, for the RL loops' scoring and training passes.

The RL loops never need a GPT-2's outputs at every position: the policy and the value model are read at the
response positions, a reward model at one token per row. `GPT2Forward.hidden` computes the final hidden states at
the positions asked for (`keep`) and skips, in the last block, the attention output, the MLP and the final layer
norm of every other position (their keys and values are still computed: the kept queries attend to them). At the
anchor's shapes that is about 5% of a trunk's FLOPs for the policy (16 of 64 positions) and about 20% for a reward
model (63 of 64). It also skips the HF forward's mask building and module calls.

`GPT2Forward(model)` reads the live parameters, so autograd trains through it; on a CPU its matrix multiplies
and their input gradients run on oneDNN (`_OneDNNAffine`). `GPT2Forward(model, pack_rows=M)` is for weights that
do not change while it is used (a frozen reference or reward model): its matrix multiplies run on weights
reordered once into oneDNN's blocked layout (`agents.decoding.PackedLinear`), on a CPU, with the MLP's GELU fused.
`response_hidden` runs a prompt shared by several rows (GRPO's and RLOO's groups) once.

It computes what the HF forward computes, at every kept position that is a real token (attention_mask 1), up to
float rounding; tests/test_gpt2_forward.py checks it against the HF forward, left- and right-padded. Where a model
is not a plain GPT-2 (`gpt2_fast_path`), the callers use the HF forward instead.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import GPT2ForSequenceClassification, GPT2LMHeadModel

from agents.decoding import _GELU, PackedLinear, gpt2_fast_path, position_ids_from_mask


class _Affine:
    """x @ W + b on the live parameters, W (in, out), with autograd (HF's Conv1D computes this as an addmm).

    On a CPU (float32, oneDNN) the forward and the input gradient run on oneDNN's linear (`_OneDNNAffine`): at the
    update's shapes (512-2048 rows, width 256) 5-20% faster than MKL's `mm`, which PyTorch otherwise calls."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, gelu: str | None = None):
        self.weight, self.bias, self.gelu = weight, bias, gelu  # gelu: F.gelu's `approximate`, applied after
        self.onednn = weight.device.type == "cpu" and weight.dtype == torch.float32 and torch.backends.mkldnn.is_available()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.onednn:
            y = _OneDNNAffine.apply(x, self.weight, self.bias)
        else:
            y = x @ self.weight if self.bias is None else torch.addmm(self.bias, x, self.weight)
        return y if self.gelu is None else F.gelu(y, approximate=self.gelu)


class _OneDNNAffine(torch.autograd.Function):
    """x @ W + b, W (in, out), by oneDNN's linear (weights as they are, not reordered); the weight gradient by
    `mm` (oneDNN was not faster for it here). `_linear_pointwise` is the op inductor emits for CPU linears; it
    has no autograd formula of its own, hence this Function."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        # oneDNN takes nn.Linear's (out, in) layout: y = x @ weight.t().t()
        return torch.ops.mkldnn._linear_pointwise(x, weight.t(), bias, "none", [], "")  # (M, out)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        grad = grad.contiguous()  # (M, out)
        dx = torch.ops.mkldnn._linear_pointwise(grad, weight, None, "none", [], "") if ctx.needs_input_grad[0] else None  # (M, in)
        dw = x.t() @ grad if ctx.needs_input_grad[1] else None  # (in, out)
        db = grad.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None  # (out,)
        return dx, dw, db


def padded_causal_mask(real: torch.Tensor) -> torch.Tensor | None:
    """(B, L, L) bool attention mask for (B, L) `real` tokens, or None when plain causal attention is exact.

    A query sees earlier real keys; a padding query also sees itself, so that no row is fully masked (a NaN there
    would reach the real rows through 0 * NaN in the attention's weighted sum). Padding after a row's last real
    token (a response's, after EOS) needs no mask: no real query sees a later key, so only the outputs at those
    padding positions change, and nothing reads them. Without left padding the attention is plain causal, the
    faster kernel path."""
    left_pad = ~real & (real.flip(-1).cumsum(-1).flip(-1) > 0)  # (B, L) padding with a real token after it
    if not left_pad.any():
        return None
    L = real.shape[1]
    ar = torch.arange(L, device=real.device)
    return (ar[None, :] <= ar[:, None]) & (real[:, None, :] | torch.eye(L, dtype=torch.bool, device=real.device))


class GPT2Forward:
    """Final hidden states, logits or sequence scores of a GPT-2 model (`GPT2LMHeadModel` or
    `GPT2ForSequenceClassification`) at chosen positions.

    `pack_rows`: pack the weights once for matrix multiplies of about that many rows (batch x length); the
    weights must then stay as they are for this object's lifetime (it is for frozen models, and no gradient
    flows through it). None: use the parameters as they are, with autograd.
    """

    def __init__(self, model: GPT2LMHeadModel | GPT2ForSequenceClassification, pack_rows: int | None = None):
        if not gpt2_fast_path(model):
            raise ValueError(f"{type(model).__name__} with this config is not supported by GPT2Forward; use its HF forward")
        c = model.config
        self.model, self.transformer = model, model.transformer
        self.eps, self.n_head, self.approximate = c.layer_norm_epsilon, c.n_head, _GELU[c.activation_function]
        self.packed = pack_rows is not None
        linear = (lambda w, b, gelu=None: PackedLinear(w, b, pack_rows, gelu)) if self.packed else _Affine  # noqa: E731
        self.linears = [  # the MLP's fc applies the GELU (on packed weights, fused into oneDNN's matrix multiply)
            [linear(b.attn.c_attn.weight, b.attn.c_attn.bias), linear(b.attn.c_proj.weight, b.attn.c_proj.bias),
             linear(b.mlp.c_fc.weight, b.mlp.c_fc.bias, self.approximate), linear(b.mlp.c_proj.weight, b.mlp.c_proj.bias)]
            for b in self.transformer.h
        ]
        head = model.lm_head if isinstance(model, GPT2LMHeadModel) else model.score  # nn.Linear, no bias
        self.head = linear(head.weight.t(), None)  # (E, V or num_labels) as x @ W

    def hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, keep: slice | torch.Tensor) -> torch.Tensor:
        """Final (ln_f) hidden states at `keep`: a slice of positions, the same for every row -> (B, K, E); or a
        (B,) tensor of one position per row -> (B, 1, E). `attention_mask` (B, L) may pad on either side."""
        if self.packed and torch.is_grad_enabled():
            raise RuntimeError("packed weights carry no gradient: call a GPT2Forward with pack_rows under torch.no_grad()")
        B, L = input_ids.shape
        tr = self.transformer
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        real = attention_mask.bool()  # (B, L)
        arange = torch.arange(L, device=input_ids.device)
        if isinstance(keep, slice):
            rows, kept = slice(None), arange[keep][None]  # (1, K) the kept positions
        else:
            rows, kept = torch.arange(B, device=input_ids.device), keep.long()[:, None]  # (B, 1)
        x = tr.wte(input_ids) + tr.wpe(position_ids_from_mask(attention_mask))  # (B, L, E)
        causal = padded_causal_mask(real)  # (B, L, L), None: plain causal
        n = len(tr.h)
        for i, block in enumerate(tr.h):
            qkv_proj, attn_proj, fc, fc_proj = self.linears[i]
            E = x.shape[-1]
            h = F.layer_norm(x, (E,), block.ln_1.weight, block.ln_1.bias, self.eps)
            q, k, v = self._heads(qkv_proj(h.reshape(-1, E)), B, L)  # each (B, H, L, D)
            if i < n - 1:
                if causal is None:
                    a = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, L, D)
                else:
                    a = F.scaled_dot_product_attention(q, k, v, attn_mask=causal[:, None])
            else:  # the last block: only the kept positions' queries, and from here on only their rows
                x = x[:, keep] if isinstance(keep, slice) else x[rows, keep][:, None]  # (B, K, E)
                q = q[:, :, keep] if isinstance(keep, slice) else q[rows, :, keep][:, :, None]  # (B, H, K, D)
                sees = arange[None, None, :] <= kept[:, :, None]  # (B or 1, K, L) causal, seen from the kept positions
                if causal is not None:
                    sees = sees & (real[:, None, :] | (arange[None, None, :] == kept[:, :, None]))  # (B, K, L)
                a = F.scaled_dot_product_attention(q, k, v, attn_mask=sees[:, None])  # (B, H, K, D)
            S = x.shape[1]
            x = x + attn_proj(a.transpose(1, 2).reshape(B * S, E)).view(B, S, E)
            h = F.layer_norm(x, (E,), block.ln_2.weight, block.ln_2.bias, self.eps).view(B * S, E)
            x = x + fc_proj(fc(h)).view(B, S, E)  # fc applies the GELU
        return F.layer_norm(x, (x.shape[-1],), tr.ln_f.weight, tr.ln_f.bias, self.eps)  # (B, K, E)

    def response_hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, P: int) -> torch.Tensor:
        """Final hidden states at positions P-1 .. L-2, those that predict (or value) the L - P response tokens
        after a P-token left-padded prompt: (B, T, E), what `hidden(..., slice(P - 1, L - 1))` returns.

        Rows with the same prompt (GRPO's and RLOO's groups) compute it once: a prompt's positions attend only to
        the prompt, so their keys and values are the same in every row of its group. The prompt runs once per
        distinct prompt, each response attends to its prompt's keys and values and to its own, and the gradients
        of the k responses add up in the shared prompt computation. At k = 4 with 16-token prompts and 48-token
        responses that is 19% fewer rows through the trunk."""
        L = input_ids.shape[1]
        prompts = torch.cat([input_ids[:, :P], attention_mask[:, :P]], dim=1)  # (B, 2P) a prompt is its ids and mask
        distinct, group = torch.unique(prompts, dim=0, return_inverse=True)  # (G, 2P), (B,) row -> its prompt
        if len(distinct) == len(prompts) or L - P < 2:  # nothing shared (PPO's batches): the plain forward
            return self.hidden(input_ids, attention_mask, slice(P - 1, L - 1))
        if self.packed and torch.is_grad_enabled():
            raise RuntimeError("packed weights carry no gradient: call a GPT2Forward with pack_rows under torch.no_grad()")
        tr, B, G, T = self.transformer, len(input_ids), len(distinct), L - P
        p_ids, p_mask = distinct[:, :P], distinct[:, P:]  # (G, P)
        p_real = p_mask.bool()
        positions = position_ids_from_mask(attention_mask)  # (B, L)
        xp = tr.wte(p_ids) + tr.wpe(position_ids_from_mask(p_mask))  # (G, P, E)
        xr = tr.wte(input_ids[:, P:]) + tr.wpe(positions[:, P:])  # (B, T, E)
        E = xp.shape[-1]
        ar = torch.arange(P + T, device=input_ids.device)
        p_causal = padded_causal_mask(p_real)  # (G, P, P), None: plain causal
        # a response query sees its prompt's real tokens and the responses' tokens up to itself (right padding after
        # EOS needs no mask: no real token comes after it)
        r_sees = torch.cat([p_real[group][:, None, :].expand(B, T, P), (ar[None, :T] <= ar[:T, None]).expand(B, T, T)], dim=2)  # (B, T, P+T)
        n = len(tr.h)
        for i, block in enumerate(tr.h):
            qkv_proj, attn_proj, fc, fc_proj = self.linears[i]
            h = F.layer_norm(torch.cat([xp.reshape(G * P, E), xr.reshape(B * T, E)]), (E,), block.ln_1.weight, block.ln_1.bias, self.eps)
            qkv = qkv_proj(h)  # (G*P + B*T, 3E): one GEMM for prompts and responses
            qp, kp, vp = self._heads(qkv[: G * P], G, P)  # each (G, H, P, D)
            qr, kr, vr = self._heads(qkv[G * P :], B, T)  # each (B, H, T, D)
            last = i == n - 1  # the last block needs only position P-1 of a prompt and 0 .. T-2 of a response
            if last:
                qp, qr = qp[:, :, P - 1 :], qr[:, :, : T - 1]
                xp, xr = xp[:, P - 1 :], xr[:, : T - 1]
            if p_causal is None and not last:
                ap = F.scaled_dot_product_attention(qp, kp, vp, is_causal=True)  # (G, H, P, D)
            else:
                sees = (ar[None, :P] <= ar[:P, None])[None] if p_causal is None else p_causal  # (G or 1, P, P)
                ap = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=sees[:, None, P - 1 :] if last else sees[:, None])
            keys, values = torch.cat([kp[group], kr], dim=2), torch.cat([vp[group], vr], dim=2)  # (B, H, P+T, D)
            ar_mask = r_sees[:, : T - 1] if last else r_sees  # (B, T or T-1, P+T)
            a_r = F.scaled_dot_product_attention(qr, keys, values, attn_mask=ar_mask[:, None])  # (B, H, T, D)
            Sp, Sr = xp.shape[1], xr.shape[1]
            a = torch.cat([ap.transpose(1, 2).reshape(G * Sp, E), a_r.transpose(1, 2).reshape(B * Sr, E)])
            x = torch.cat([xp.reshape(G * Sp, E), xr.reshape(B * Sr, E)]) + attn_proj(a)  # (G*Sp + B*Sr, E)
            h = F.layer_norm(x, (E,), block.ln_2.weight, block.ln_2.bias, self.eps)
            x = x + fc_proj(fc(h))  # fc applies the GELU
            xp, xr = x[: G * Sp].view(G, Sp, E), x[G * Sp :].view(B, Sr, E)
        x = torch.cat([xp[group], xr], dim=1)  # (B, T, E): position P-1 from the row's prompt, then its response
        return F.layer_norm(x, (E,), tr.ln_f.weight, tr.ln_f.bias, self.eps)

    def _heads(self, qkv: torch.Tensor, B: int, L: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        H = self.n_head
        q, k, v = qkv.view(B, L, 3, H, -1).permute(2, 0, 3, 1, 4)  # each (B, H, L, D)
        return q, k, v

    def apply_head(self, hidden: torch.Tensor) -> torch.Tensor:
        """The model's head (LM head or score) on (B, K, E) hidden states: (B, K, V or num_labels)."""
        return self.head(hidden.reshape(-1, hidden.shape[-1])).view(*hidden.shape[:2], -1)

    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, keep: slice | torch.Tensor) -> torch.Tensor:
        """Next-token logits at `keep` (a `GPT2LMHeadModel`): (B, K, V)."""
        return self.apply_head(self.hidden(input_ids, attention_mask, keep))

    def scores(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """What `GPT2ForSequenceClassification` returns as logits: the head at each row's rightmost non-PAD token
        (the last position if the config has no PAD): (B, num_labels). Positions count real tokens, as everywhere
        here; for right padding that is HF's default too."""
        pad = self.model.config.pad_token_id
        L = input_ids.shape[1]
        if pad is None:
            if input_ids.shape[0] != 1:  # as HF: without a PAD id the last real token cannot be found
                raise ValueError("Cannot handle batch sizes > 1 if no padding token is defined.")
            last = torch.full((1,), L - 1, device=input_ids.device)  # (1,)
        else:
            last = (torch.arange(L, device=input_ids.device) * (input_ids != pad)).argmax(-1)  # (B,) as HF picks it
        return self.apply_head(self.hidden(input_ids, attention_mask, last))[:, 0]  # (B, num_labels)


def lean_forward(model, pack_rows: int | None = None) -> GPT2Forward | None:
    """A `GPT2Forward` of `model` where it is exact (`gpt2_fast_path`), else None (use the HF forward); a
    `GPT2Forward` comes back as it is. `pack_rows`: see `GPT2Forward`; CPU float32 weights only, elsewhere the
    weights are used as they are."""
    if isinstance(model, GPT2Forward):
        return model
    return GPT2Forward(model, pack_rows) if gpt2_fast_path(model) else None


def frozen_forward(model, pack_rows: int):
    """What to run a model through while its weights stay fixed (a reference, a reward model, the value model
    during a rollout): its `GPT2Forward` on weights packed for `pack_rows`-row multiplies, or the model itself."""
    return lean_forward(model, pack_rows) or model
