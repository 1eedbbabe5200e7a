"""Incremental decoders: the lean path (GPT-2 and Llama trunks) and the HF path give the logits of a plain, unpadded HF
forward."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from textenv.models.decoding import HFDecoder, make_decoder
from textenv.models.gpt2 import gpt2_fast_path
from textenv.models.lean import LeanDecoder


def left_padded(rows: list[list[int]], P: int, pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.full((len(rows), P), pad)
    mask = torch.zeros(len(rows), P, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, P - len(r) :] = torch.tensor(r)
        mask[i, P - len(r) :] = 1
    return ids, mask


def gpt2(**kw) -> GPT2LMHeadModel:
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=97, n_positions=32, n_embd=32, n_layer=2, n_head=4, resid_pdrop=0.0, embd_pdrop=0.0,
                     attn_pdrop=0.0, **kw)
    return GPT2LMHeadModel(cfg).eval()


def llama(**kw) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=32, **kw)
    return LlamaForCausalLM(cfg).eval()


def llama_gelu() -> LlamaForCausalLM:
    return llama(hidden_act="gelu")  # no lean trunk: the HF decoder


PROMPTS = [[5, 6, 7, 8, 9], [11, 12], [13]]  # left-padded to P = 6: three different pad widths
STEPS = [[20, 21, 22], [30, 31, 32], [40, 41, 42]]  # three decode steps per row


# groups, as GRPO's and RLOO's rollouts have them: rows that share a prompt (the GPT-2 prefill encodes it once)
GROUPED = [PROMPTS[0], PROMPTS[1], PROMPTS[0], PROMPTS[2], PROMPTS[1]]
GROUPED_STEPS = [[20, 21, 22], [30, 31, 32], [50, 51, 52], [40, 41, 42], [60, 61, 62]]


@pytest.mark.parametrize("make", [gpt2, llama, llama_gelu], ids=["gpt2", "llama", "hf"])
@pytest.mark.parametrize("prompts,steps", [(PROMPTS, STEPS), (GROUPED, GROUPED_STEPS)], ids=["distinct", "grouped"])
def test_decoder_logits_equal_unpadded_hf_forward(make, prompts, steps):
    model = make()
    decoder = make_decoder(model, batch_size=len(prompts), max_len=6 + 3)
    assert isinstance(decoder, HFDecoder if make is llama_gelu else LeanDecoder)
    ids, mask = left_padded(prompts, 6)
    with torch.no_grad():
        got = [decoder.prefill(ids, mask)]
        for t in range(3):
            got.append(decoder.step(torch.tensor([s[t] for s in steps])))
        for i, prompt in enumerate(prompts):  # each row alone, unpadded, no cache
            full = model(input_ids=torch.tensor([prompt + steps[i]])).logits[0]  # (len, V)
            for t in range(4):
                torch.testing.assert_close(got[t][i], full[len(prompt) - 1 + t], atol=2e-5, rtol=1e-4)


def test_gpt2_decoder_equals_hf_decoder():
    model = gpt2(activation_function="gelu_new")
    ids, mask = left_padded(PROMPTS, 6)
    lean, hf = LeanDecoder(model, 3, 9), HFDecoder(model, 3, 9)
    with torch.no_grad():
        torch.testing.assert_close(lean.prefill(ids, mask), hf.prefill(ids, mask), atol=1e-5, rtol=1e-5)
        for t in range(3):
            tokens = torch.tensor([s[t] for s in STEPS])
            torch.testing.assert_close(lean.step(tokens), hf.step(tokens), atol=1e-5, rtol=1e-5)


def test_fast_path_only_where_exact():
    assert gpt2_fast_path(gpt2())
    assert not gpt2_fast_path(gpt2(scale_attn_by_inverse_layer_idx=True))
    assert not gpt2_fast_path(gpt2(activation_function="relu"))
    assert not gpt2_fast_path(llama())
    hooked = gpt2()
    hooked.register_forward_hook(lambda m, args, out: out)  # a hook may edit the output: the HF forward must run
    assert not gpt2_fast_path(hooked)
    swapped = gpt2()
    swapped.transformer.h[0].attn.c_attn = torch.nn.Identity()  # e.g. an adapter layer swapped in
    assert not gpt2_fast_path(swapped)
    with pytest.raises(ValueError, match="not supported by LeanDecoder"):
        LeanDecoder(gpt2(activation_function="relu"), 1, 4)


def test_packed_linear_is_x_at_w_plus_b():
    from textenv.models.onednn import PackedLinear

    torch.manual_seed(0)
    w, b = torch.randn(64, 96), torch.randn(96)  # (in, out), as GPT-2's Conv1D
    for rows in (32, 5, 200):  # packed for 32 rows; any row count is still served
        x = torch.randn(rows, 64)
        for bias in (b, None):
            lin = PackedLinear(w, bias, 32)
            assert lin.packed == torch.backends.mkldnn.is_available()
            want = x @ w if bias is None else torch.addmm(bias, x, w)
            torch.testing.assert_close(lin(x), want, atol=1e-5, rtol=1e-5)
    # float64 (or a GPU) is left to addmm: exactly the same numbers
    lin = PackedLinear(w.double(), b.double(), 32)
    assert not lin.packed
    x = torch.randn(7, 64, dtype=torch.float64)
    assert torch.equal(lin(x), torch.addmm(b.double(), x, w.double()))
