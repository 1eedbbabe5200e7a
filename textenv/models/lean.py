"""The lean paths over an HF model's own weights: scoring and training (`LeanForward`) and incremental decoding
(`LeanDecoder`), for every architecture that has a trunk here (`gpt2.GPT2Trunk`, `llama.LlamaTrunk`).

- `LeanForward.hidden`: final hidden states at the positions asked for (`keep`). In the last block it skips the
  attention output, the MLP and the final norm of every other position (their keys and values are still computed:
  the kept queries attend to them). The RL loops read the policy and value at the response positions (16 of 64 at
  the anchor's shapes, about 5% of a trunk's FLOPs) and a reward model at one token per row (about 20%). It also
  skips the HF forward's mask building and module calls.
- `LeanForward.response_hidden`: the same at the response positions, with a prompt shared by several rows (GRPO's
  and RLOO's groups) run once.
- `LeanDecoder`: incremental decoding with the keys and values written in place into buffers allocated once. A
  cached decode step of a small model on a CPU is dominated by per-op overhead (about 2.5 of 4.5 ms at batch 32
  here: module calls, mask building, cache objects, `torch.cat` of the cache, a six-op GELU); this path issues
  about a dozen ops per layer. Grouped-query attention reads each key/value head once for its group of query heads:
  the cache holds the model's key/value heads, never repeated.

A trunk is one architecture's pieces as these paths call them: `embed(ids, positions)`, `rope(positions)` (None, or
the rotary cos/sin of each row), `layers` (each `layer(x, rope, attend)` one block on token rows, with the
attention handed in), `norm` (the final norm), `head`, and the head counts. The engine owns the attention: which
queries see which keys, the cache, shared prompts.

`LeanForward(model)` reads the live parameters, so autograd trains through it (`onednn.Affine`);
`LeanForward(model, pack_rows=M)` and the decoder run on weights reordered once into oneDNN's blocked layout
(`onednn.PackedLinear`), for weights that do not change while they are used.

A PEFT model with plain LoRA layers runs here too, and so does its `AdapterOff` (the base alone): the packed paths
merge the adapter into the weights they pack, the live path adds it as two thin multiplies
(`textenv.models.adapters`).

Positions count real tokens only, so a left-padded prompt is encoded as if unpadded. Each computes what the HF
forward computes at every real token (attention_mask 1), up to float rounding (tests/test_gpt2_forward.py,
tests/test_llama_forward.py and tests/test_decoding.py, left- and right-padded). Where a model has no exact trunk
(`fast_path` is None), callers use the HF forward (`decoding.HFDecoder`, or the model itself).
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F

from textenv.models.adapters import AdapterOff, unwrap
from textenv.models.gpt2 import GPT2Trunk, gpt2_fast_path
from textenv.models.llama import LlamaTrunk, llama_fast_path
from textenv.models.onednn import Affine, PackedLinear
from textenv.models.tokens import position_ids_from_mask


def fast_path(model) -> type[GPT2Trunk] | type[LlamaTrunk] | None:
    """The trunk that computes exactly what this model's HF forward computes, or None (use the HF forward). `model`:
    an HF model, a PEFT model with plain LoRA layers, or its `AdapterOff` (`textenv.models.adapters`)."""
    inner = unwrap(model)
    if inner is None:
        return None
    if gpt2_fast_path(inner[0]):
        return GPT2Trunk
    if llama_fast_path(inner[0]):
        return LlamaTrunk
    return None


# ------------------------------------------------------------------------------------------------- attention


def heads(t: torch.Tensor, B: int, L: int) -> torch.Tensor:
    """(B*L, H, D) rows of a projection -> (B, H, L, D)."""
    return t.view(B, L, *t.shape[1:]).transpose(1, 2)


def merge_heads(a: torch.Tensor) -> torch.Tensor:
    """(B, H, L, D) -> (B*L, H*D) rows."""
    B, H, L, D = a.shape
    return a.transpose(1, 2).reshape(B * L, H * D)


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kwargs) -> torch.Tensor:
    """`F.scaled_dot_product_attention` with q (B, H, L, D) and k, v (B, Hkv, S, D): Hkv < H is grouped-query
    attention, each key/value head serving H / Hkv query heads as HF's `repeat_kv` pairs them."""
    return F.scaled_dot_product_attention(q, k, v, enable_gqa=k.shape[1] != q.shape[1], **kwargs)


def padded_causal_mask(real: torch.Tensor) -> torch.Tensor:
    """(B, L, L) bool attention mask for (B, L) `real` tokens: a query sees earlier real keys; a padding query also
    sees itself, so that no row is fully masked (a NaN there would reach the real rows through 0 * NaN in the
    attention's weighted sum)."""
    L = real.shape[1]
    ar = torch.arange(L, device=real.device)
    return (ar[None, :] <= ar[:, None]) & (real[:, None, :] | torch.eye(L, dtype=torch.bool, device=real.device))


def left_padded(real: torch.Tensor) -> bool:
    """Whether a (B, L) row has padding before a real token. Padding after a row's last real token (a response's,
    after EOS) needs no mask: no real query sees a later key, so only the outputs at those padding positions change,
    and nothing reads them. Without left padding the attention is plain causal, the faster kernel path."""
    return bool((~real & (real.flip(-1).cumsum(-1).flip(-1) > 0)).any())


def attend_one(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(D) + bias) v for one query per row: q (B, H, 1, D), keys/values (B, Hkv, L, D), bias
    (B, 1, 1, L) -> (B, H, 1, D). What `sdpa` computes, in two batched matmuls (they beat the CPU flash kernel for
    one query here); the G = H / Hkv query heads of a key/value head are one (G, D) @ (D, L) product, so grouped
    keys are read once and never repeated."""
    B, Hkv, L, D = keys.shape
    G = q.shape[1] // Hkv
    scores = torch.baddbmm(bias.expand(B, Hkv, G, L).reshape(B * Hkv, G, L), q.reshape(B * Hkv, G, D),
                           keys.reshape(B * Hkv, L, D).transpose(1, 2), alpha=D**-0.5)  # (B*Hkv, G, L)
    return torch.bmm(scores.softmax(-1), values.reshape(B * Hkv, L, D)).view(B, Hkv * G, 1, D)


# ------------------------------------------------------------------------------------------- scoring and training


class LeanForward:
    """Final hidden states, logits or sequence scores of a model with a trunk here (its causal LM or its
    sequence-classification class) at chosen positions.

    `pack_rows`: pack the weights once for matrix multiplies of about that many rows (batch x length); the
    weights must then stay as they are for this object's lifetime (it is for frozen models, and no gradient
    flows through it). None: use the parameters as they are, with autograd.
    """

    def __init__(self, model, pack_rows: int | None = None):
        trunk = fast_path(model)
        if trunk is None:
            raise ValueError(f"{type(model).__name__} with this config is not supported by LeanForward; "
                             "use its HF forward")
        self.model, adapters = unwrap(model)  # the HF model (a PEFT model's, with its LoRA layers)
        self.packed = pack_rows is not None
        self.trunk = trunk(self.model, partial(PackedLinear, rows=pack_rows) if self.packed else Affine,
                           packed=self.packed, adapters=adapters)

    def _check_grad(self) -> None:
        if self.packed and torch.is_grad_enabled():
            raise RuntimeError("packed weights carry no gradient: "
                               "call a LeanForward with pack_rows under torch.no_grad()")

    def hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
               keep: slice | torch.Tensor) -> torch.Tensor:
        """Final hidden states at `keep`: a slice of positions, the same for every row -> (B, K, E); or a
        (B,) tensor of one position per row -> (B, 1, E). `attention_mask` (B, L) may pad on either side."""
        self._check_grad()
        B, L = input_ids.shape
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        real = attention_mask.bool()  # (B, L)
        arange = torch.arange(L, device=input_ids.device)
        if isinstance(keep, slice):
            rows, kept = slice(None), arange[keep][None]  # (1, K) the kept positions
        else:
            rows, kept = torch.arange(B, device=input_ids.device), keep.long()[:, None]  # (B, 1)
        mask = padded_causal_mask(real)[:, None] if left_padded(real) else None  # (B, 1, L, L); None: plain causal

        def attend(q, k, v, x):  # every position's query
            q, k, v = heads(q, B, L), heads(k, B, L), heads(v, B, L)  # (B, H or Hkv, L, D)
            a = sdpa(q, k, v, attn_mask=mask, is_causal=mask is None)  # (B, H, L, D)
            return merge_heads(a), x

        def attend_kept(q, k, v, x):  # the last block: only the kept positions' queries, and from here on their rows
            q, k, v = heads(q, B, L), heads(k, B, L), heads(v, B, L)
            x = x.view(B, L, -1)
            x = x[:, keep] if isinstance(keep, slice) else x[rows, keep][:, None]  # (B, K, E)
            q = q[:, :, keep] if isinstance(keep, slice) else q[rows, :, keep][:, :, None]  # (B, H, K, D)
            sees = arange[None, None, :] <= kept[:, :, None]  # (B or 1, K, L) causal, seen from the kept positions
            if mask is not None:
                sees = sees & (real[:, None, :] | (arange[None, None, :] == kept[:, :, None]))  # (B, K, L)
            a = sdpa(q, k, v, attn_mask=sees[:, None])  # (B, H, K, D)
            return merge_heads(a), x.reshape(-1, x.shape[-1])

        trunk = self.trunk
        positions = position_ids_from_mask(attention_mask)  # (B, L)
        x = trunk.embed(input_ids, positions)  # (B, L, E)
        x, rope = x.view(B * L, -1), trunk.rope(positions.reshape(-1))  # rope: per row, or None
        n = len(trunk.layers)
        for i, layer in enumerate(trunk.layers):
            x = layer(x, rope, attend if i < n - 1 else attend_kept)
        return trunk.norm(x.view(B, -1, x.shape[-1]))  # (B, K, E)

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
        self._check_grad()
        trunk, B, G, T = self.trunk, len(input_ids), len(distinct), L - P
        p_ids, p_mask = distinct[:, :P], distinct[:, P:]  # (G, P)
        p_real = p_mask.bool()
        positions = position_ids_from_mask(attention_mask)  # (B, L)
        p_positions = position_ids_from_mask(p_mask)  # (G, P)
        xp = trunk.embed(p_ids, p_positions)  # (G, P, E)
        xr = trunk.embed(input_ids[:, P:], positions[:, P:])  # (B, T, E)
        E = xp.shape[-1]
        ar = torch.arange(P + T, device=input_ids.device)
        p_mask_full = padded_causal_mask(p_real) if left_padded(p_real) else None  # (G, P, P), None: plain causal
        # a response query sees its prompt's real tokens and the responses' tokens up to itself (right padding after
        # EOS needs no mask: no real token comes after it)
        r_sees = torch.cat([p_real[group][:, None, :].expand(B, T, P),
                            (ar[None, :T] <= ar[:T, None]).expand(B, T, T)], dim=2)  # (B, T, P+T)

        def attend(q, k, v, x, last: bool):  # rows: the G*P prompt tokens, then the B*T response tokens
            qp, kp, vp = (heads(t[: G * P], G, P) for t in (q, k, v))  # (G, H or Hkv, P, D)
            qr, kr, vr = (heads(t[G * P :], B, T) for t in (q, k, v))  # (B, H or Hkv, T, D)
            if last:  # the last block needs only position P-1 of a prompt and 0 .. T-2 of a response
                qp, qr = qp[:, :, P - 1 :], qr[:, :, : T - 1]
                x = torch.cat([x[: G * P].view(G, P, E)[:, P - 1 :].reshape(G, E),
                               x[G * P :].view(B, T, E)[:, : T - 1].reshape(B * (T - 1), E)])
            if p_mask_full is None and not last:
                ap = sdpa(qp, kp, vp, is_causal=True)  # (G, H, P, D)
            else:
                sees = (ar[None, :P] <= ar[:P, None])[None] if p_mask_full is None else p_mask_full  # (G or 1, P, P)
                ap = sdpa(qp, kp, vp, attn_mask=sees[:, None, P - 1 :] if last else sees[:, None])
            keys, values = torch.cat([kp[group], kr], dim=2), torch.cat([vp[group], vr], dim=2)  # (B, Hkv, P+T, D)
            ar_mask = r_sees[:, : T - 1] if last else r_sees  # (B, T or T-1, P+T)
            a_r = sdpa(qr, keys, values, attn_mask=ar_mask[:, None])  # (B, H, T, D)
            return torch.cat([merge_heads(ap), merge_heads(a_r)]), x

        x = torch.cat([xp.reshape(G * P, E), xr.reshape(B * T, E)])  # one GEMM for prompts and responses
        rope = trunk.rope(torch.cat([p_positions.reshape(-1), positions[:, P:].reshape(-1)]))  # the rows' order
        n = len(trunk.layers)
        for i, layer in enumerate(trunk.layers):
            x = layer(x, rope, partial(attend, last=i == n - 1))
        xp, xr = x[:G].view(G, 1, E), x[G:].view(B, T - 1, E)
        x = torch.cat([xp[group], xr], dim=1)  # (B, T, E): position P-1 from the row's prompt, then its response
        return trunk.norm(x)

    def apply_head(self, hidden: torch.Tensor) -> torch.Tensor:
        """The model's head (LM head or score) on (B, K, E) hidden states: (B, K, V or num_labels)."""
        return self.trunk.head(hidden.reshape(-1, hidden.shape[-1])).view(*hidden.shape[:2], -1)

    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
               keep: slice | torch.Tensor) -> torch.Tensor:
        """Next-token logits at `keep` (a causal LM): (B, K, V)."""
        return self.apply_head(self.hidden(input_ids, attention_mask, keep))

    def scores(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """What the sequence-classification class returns as logits: the head at each row's rightmost non-PAD token
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


def lean_forward(model, pack_rows: int | None = None) -> LeanForward | None:
    """A `LeanForward` of `model` where it is exact (`fast_path`), else None (use the HF forward); a `LeanForward`
    comes back as it is. `pack_rows`: see `LeanForward`; CPU float32 weights only, elsewhere the weights are used
    as they are."""
    if isinstance(model, LeanForward):
        return model
    return LeanForward(model, pack_rows) if fast_path(model) else None


def frozen_forward(model, pack_rows: int):
    """What to run a model through while its weights stay fixed (a reference, a reward model, the value model
    during a rollout): its `LeanForward` on weights packed for `pack_rows`-row multiplies, or the model itself.
    An `AdapterOff` (a LoRA policy's reference) runs on its base weights as they are: they are the policy's own,
    and packing them would hold the second copy that LoRA is there to save."""
    return lean_forward(model, None if isinstance(model, AdapterOff) else pack_rows) or model


# ---------------------------------------------------------------------------------------------------- decoding


class LeanDecoder:
    """Decoding a causal LM that has a trunk here over the model's weights, with preallocated key/value buffers;
    the interface of `decoding.HFDecoder`."""

    def __init__(self, model, batch_size: int, max_len: int):
        trunk = fast_path(model)
        inner = None if trunk is None else unwrap(model)  # the HF model (a PEFT model's, with its LoRA layers)
        if inner is None or not trunk.is_causal_lm(inner[0]):
            raise ValueError(f"{type(model).__name__} with this config is not supported by LeanDecoder; use HFDecoder")
        self.model, adapters = inner
        # the weights stay fixed for this decoder's lifetime (one rollout), so they are packed once for B rows (a
        # LoRA adapter merged in)
        self.trunk = trunk(self.model, partial(PackedLinear, rows=batch_size), packed=True, adapters=adapters)
        w = next(self.model.parameters())
        B, Hkv, D = batch_size, self.trunk.n_kv_head, self.trunk.head_dim
        n = len(self.trunk.layers)
        self.keys = [w.new_zeros(B, Hkv, max_len, D) for _ in range(n)]  # (B, Hkv, L, D) per layer
        self.values = [w.new_zeros(B, Hkv, max_len, D) for _ in range(n)]
        # additive attention bias over key slots: 0 for a real token, the dtype's minimum for padding and for slots
        # not written yet. Row b's tokens after the prompt go to slots P, P+1, ... in order (`fill[b]`: its next
        # slot), so a multi-turn env's reply that only some rows get costs the other rows no slots.
        self.bias = w.new_zeros(B, 1, 1, max_len)  # (B, 1, 1, L)
        self.fill = None  # (B,) each row's next slot
        self.length = 0  # max(fill): the slots attention reads
        self.aligned = True  # every row's fill is `length` (single-turn decoding): steps write one slice
        self.next_position = None  # (B,)

    def _attend(self, B: int, S: int, bias: torch.Tensor, rows: torch.Tensor | None, i: int, q, k, v, x):
        """Layer i's attention for the prefill's x at cache slots [0, S); its keys and values go into the cache.
        `rows`: x holds distinct prompts and cache row r takes prompt rows[r]'s."""
        q, k, v = heads(q, B, S), heads(k, B, S), heads(v, B, S)  # (B, H or Hkv, S, D)
        self.keys[i][:, :, :S] = k if rows is None else k[rows]
        self.values[i][:, :, :S] = v if rows is None else v[rows]
        a = sdpa(q, k, v, attn_mask=bias)  # (B, H, S, D): the cache holds just these
        return merge_heads(a), x

    def _blocks(self, x: torch.Tensor, positions: torch.Tensor, attend) -> torch.Tensor:
        """x (B, S, E) at `positions` (B, S) through every block and the final norm; `attend(i, q, k, v, x)` is
        layer i's attention (`_attend` for the prefill, `_attend_step` for a decode step, `_attend_rows` for a
        chunk), which also writes the cache."""
        B, S, E = x.shape
        x, rope = x.reshape(B * S, E), self.trunk.rope(positions.reshape(-1))
        for i, layer in enumerate(self.trunk.layers):
            x = layer(x, rope, partial(attend, i))
        return self.trunk.norm(x.view(B, S, E))

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.trunk.head(x.contiguous())  # (B, E) -> (B, V)

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Encode (B, P) left-padded prompts; return the (B, V) logits of the first response token. Rows with the
        same prompt (GRPO's and RLOO's groups) encode it once and share its keys and values."""
        P = input_ids.shape[1]
        neg = torch.finfo(self.bias.dtype).min
        self.bias[:, 0, 0, :P] = torch.where(attention_mask.bool(), 0.0, neg)
        self.bias[:, 0, 0, P:] = neg
        self.length, self.next_position = P, attention_mask.sum(-1)  # (B,)
        self.fill, self.aligned = torch.full_like(self.next_position, P), True
        distinct, rows = torch.unique(torch.cat([input_ids, attention_mask], dim=1), dim=0, return_inverse=True)
        if len(distinct) == len(input_ids):
            rows = None  # nothing shared: the rows as they are
        else:
            input_ids, attention_mask = distinct[:, :P], distinct[:, P:]  # (G, P) each
        # G prompts to encode below: the B rows, or the distinct prompts
        positions = position_ids_from_mask(attention_mask)  # (G, P)
        x = self.trunk.embed(input_ids, positions)  # (G, P, E)
        allowed = padded_causal_mask(attention_mask.bool())  # (G, P, P)
        bias = torch.where(allowed, 0.0, neg).to(self.bias.dtype)[:, None]  # (G, 1, P, P)
        h = self._blocks(x, positions, partial(self._attend, len(x), P, bias, rows))  # (G, P, E)
        logits = self._logits(h[:, -1])  # (G, V)
        return logits if rows is None else logits[rows]

    def _reserve(self, slots: int) -> None:
        """Grow the key/value and bias buffers (doubling) so that they hold `slots` slots."""
        capacity = self.bias.shape[-1]
        if slots <= capacity:
            return
        grow = max(slots, 2 * capacity) - capacity
        self.keys = [F.pad(k, (0, 0, 0, grow)) for k in self.keys]  # (B, Hkv, L, D): pad the slot dimension
        self.values = [F.pad(v, (0, 0, 0, grow)) for v in self.values]
        self.bias = F.pad(self.bias, (0, grow), value=torch.finfo(self.bias.dtype).min)  # not written: masked

    def extend(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Append a chunk of (B, S) tokens, each row's real ones (mask 1) first, then padding (mask 0). Returns the
        (B, V) logits after each row's last real token (0 for a row with none). Positions count real tokens only,
        as under left padding. Only the rows with a real token run (a multi-turn env's replies arrive for some rows
        at a step), each at its own next slots: the others' caches do not change."""
        B, S = tokens.shape
        rows = torch.nonzero(mask.bool().any(1)).squeeze(1)  # (b,) the rows that run
        b, m = len(rows), mask[rows]
        real = m.bool()  # (b, S)
        slots = self.fill[rows, None] + torch.arange(S, device=tokens.device)  # (b, S) where the chunk goes
        end = int(slots[:, -1].max()) + 1
        self._reserve(end)
        neg = torch.finfo(self.bias.dtype).min
        positions = self.next_position[rows, None] + position_ids_from_mask(m)  # (b, S)
        x = self.trunk.embed(tokens[rows], positions)  # (b, S, E)
        within = torch.where(padded_causal_mask(real), 0.0, neg).to(self.bias.dtype)  # (b, S, S)
        # (b, 1, S, end): each row's cache as its slots allow, and causal within the chunk at the chunk's slots
        bias = self.bias[rows, :, :, :end].expand(b, 1, S, end).clone()
        bias.scatter_(-1, slots[:, None, None, :].expand(b, 1, S, S), within[:, None])
        h = self._blocks(x, positions, partial(self._attend_rows, rows, slots, end, bias))  # (b, S, E)
        # the chunk's padding stays masked; the row's next token takes the slot after its last real one
        self.bias[rows[:, None], 0, 0, slots] = torch.where(real, 0.0, neg).to(self.bias.dtype)
        n = m.sum(-1)  # (b,)
        self.fill[rows] += n
        self.next_position[rows] += n
        self.length = int(self.fill.max())
        self.aligned = bool((self.fill == self.length).all())
        last = (n - 1).clamp(min=0)  # (b,)
        logits = self._logits(h[torch.arange(b, device=h.device), last])  # (b, V)
        return logits.new_zeros(B, logits.shape[-1]).index_copy_(0, rows, logits)

    def _attend_rows(self, rows: torch.Tensor, slots: torch.Tensor, end: int, bias: torch.Tensor, i: int, q, k, v, x):
        """Layer i's attention for a chunk of `rows` written at their `slots` (b, S), over those rows' cache."""
        b, S = slots.shape
        q, k, v = heads(q, b, S), heads(k, b, S), heads(v, b, S)  # (b, H or Hkv, S, D)
        self.keys[i][rows[:, None], :, slots] = k.transpose(1, 2)  # (b, S, Hkv, D) at (row, slot)
        self.values[i][rows[:, None], :, slots] = v.transpose(1, 2)
        keys, values = self.keys[i][rows, :, :end], self.values[i][rows, :, :end]  # (b, Hkv, end, D)
        a = sdpa(q, keys, values, attn_mask=bias)
        return merge_heads(a), x

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Append (B,) tokens, each at its row's next slot; return the (B, V) logits of the next one."""
        B = len(tokens)
        if self.aligned:  # every row writes slot `length`: one slice
            slot = self.length
            self._reserve(slot + 1)
            self.bias[:, 0, 0, slot] = 0.0
            write = partial(self._write_slice, slot)
        else:
            slots = self.fill.clone()  # (B,)
            self._reserve(int(slots.max()) + 1)
            self.bias[torch.arange(B), 0, 0, slots] = 0.0
            write = partial(self._write_rows, slots)
        self.fill += 1
        self.length = int(self.fill.max()) if not self.aligned else self.length + 1
        # a row past the model's context has ended its episode (a rollout feeds it PAD until every row has): its
        # logits are never read, so its position is clamped rather than let overflow a position table
        positions = self.next_position.clamp(max=self.trunk.max_positions - 1)[:, None]  # (B, 1)
        x = self.trunk.embed(tokens[:, None], positions)  # (B, 1, E)
        x = self._blocks(x, positions, partial(self._attend_step, write, self.bias[:, :, :, : self.length]))
        self.next_position = self.next_position + 1
        return self._logits(x[:, 0])

    def _write_slice(self, slot: int, i: int, k: torch.Tensor, v: torch.Tensor) -> None:
        self.keys[i][:, :, slot] = k[:, :, 0]
        self.values[i][:, :, slot] = v[:, :, 0]

    def _write_rows(self, slots: torch.Tensor, i: int, k: torch.Tensor, v: torch.Tensor) -> None:
        rows = torch.arange(len(slots), device=slots.device)
        self.keys[i][rows, :, slots] = k[:, :, 0]  # (B, Hkv, D) at (row, slot)
        self.values[i][rows, :, slots] = v[:, :, 0]

    def _attend_step(self, write, bias: torch.Tensor, i: int, q, k, v, x):
        """Layer i's attention for one new token per row, written into the cache by `write`."""
        B = len(bias)
        q, k, v = heads(q, B, 1), heads(k, B, 1), heads(v, B, 1)  # (B, H or Hkv, 1, D)
        write(i, k, v)
        L = bias.shape[-1]
        return merge_heads(attend_one(q, self.keys[i][:, :, :L], self.values[i][:, :, :L], bias)), x
