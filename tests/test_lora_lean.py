"""LoRA layers on the lean paths (textenv/models/adapters.py): a PEFT model's lean forward, live and packed, and its
lean decoder compute what peft's own HF forward computes, with the adapter on and off (`AdapterOff`), and the live
path's gradients reach the adapter and only the adapter; a LoRA layer the lean paths cannot read keeps the HF
forward."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import (
    GPT2Config,
    GPT2ForSequenceClassification,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from textenv.models.adapters import AdapterOff
from textenv.models.decoding import HFDecoder, make_decoder
from textenv.models.lean import LeanDecoder, LeanForward, fast_path, lean_forward
from textenv.models.loading import quiet_peft
from textenv.models.tokens import position_ids_from_mask

PAD = 0
LLAMA = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, pad_token_id=PAD)
MODELS = {  # name -> (causal LM, or sequence classifier with num_labels=1)
    "gpt2": lambda kind: (GPT2LMHeadModel if kind == "lm" else GPT2ForSequenceClassification)(GPT2Config(
        vocab_size=97, n_positions=64, n_embd=32, n_layer=2, n_head=4, pad_token_id=PAD, num_labels=1,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)),
    "llama-untied-bias": lambda kind: (LlamaForCausalLM if kind == "lm" else LlamaForSequenceClassification)(
        LlamaConfig(**LLAMA, tie_word_embeddings=False, attention_bias=True, mlp_bias=True, num_labels=1)),
    "qwen3": lambda kind: Qwen3ForCausalLM(Qwen3Config(**LLAMA, head_dim=16)),
}


def adapted(name: str, kind: str = "lm", **lora):
    """A PEFT model on a random base whose adapter is not zero (as after training), in eval mode."""
    torch.manual_seed(0)
    base = MODELS[name](kind).eval()
    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", fan_in_fan_out=name == "gpt2",
                        task_type="CAUSAL_LM" if kind == "lm" else "SEQ_CLS", **lora)
    with quiet_peft():
        model = get_peft_model(base, config).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n or "modules_to_save" in n:  # B starts at 0; the trained head copy starts as the head
                p.normal_(std=0.3, generator=torch.Generator().manual_seed(len(n)))
    return model


def batch():
    ids = torch.randint(3, 97, (3, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    mask[2, -2:] = 0  # right padding
    return ids.masked_fill(mask == 0, PAD), mask


def hf_logits(model, ids, mask):
    return model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits


@pytest.mark.parametrize("name", MODELS)
def test_lean_forward_of_a_peft_model_is_peft_s_forward_adapter_on_and_off(name):
    model, (ids, mask) = adapted(name), batch()
    assert fast_path(model) is not None and fast_path(AdapterOff(model)) is not None
    keep = slice(2, 9)
    real = mask[:, keep].bool()
    want = hf_logits(model, ids, mask)[:, keep]
    ours = LeanForward(model).logits(ids, mask, keep)  # live: base multiply + s (x A^T) B^T
    torch.testing.assert_close(ours[real], want[real], atol=1e-5, rtol=1e-5)
    trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert trained and all("lora_" in n for n, _ in trained)  # peft froze the base
    grad = torch.randn_like(want)
    got_grads = torch.autograd.grad(ours[real], [p for _, p in trained], grad[real])
    want_grads = torch.autograd.grad(want[real], [p for _, p in trained], grad[real])
    for (n, _), g, w in zip(trained, got_grads, want_grads):  # every adapter matrix's gradient
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-4, msg=n)
    with torch.no_grad():
        packed = LeanForward(model, pack_rows=27).logits(ids, mask, keep)  # the adapter merged into packed weights
        torch.testing.assert_close(packed[real], want.detach()[real], atol=1e-5, rtol=1e-5)
        with model.disable_adapter():
            base = hf_logits(model, ids, mask)[:, keep]
        for lean in (LeanForward(AdapterOff(model)), LeanForward(AdapterOff(model), pack_rows=27)):
            torch.testing.assert_close(lean.logits(ids, mask, keep)[real], base[real], atol=1e-5, rtol=1e-5)
        assert (base[real] - want.detach()[real]).abs().max() > 1e-2  # the adapter changes the model


@pytest.mark.parametrize("name", MODELS)
def test_lean_decoder_of_a_peft_model_steps_as_peft_s_forward(name):
    model = adapted(name)
    prompts, steps = [[5, 6, 7, 8], [11, 12]], [[20, 21, 22], [30, 31, 32]]
    ids = torch.tensor([[5, 6, 7, 8], [PAD, PAD, 11, 12]])
    mask = (ids != PAD).long()
    decoder = make_decoder(model, batch_size=2, max_len=8)
    assert isinstance(decoder, LeanDecoder)
    with torch.no_grad():
        got = [decoder.prefill(ids, mask)] + [decoder.step(torch.tensor([s[t] for s in steps])) for t in range(3)]
        for i, prompt in enumerate(prompts):
            full = model(input_ids=torch.tensor([prompt + steps[i]])).logits[0]  # (len, V), unpadded and uncached
            for t in range(4):
                torch.testing.assert_close(got[t][i], full[len(prompt) - 1 + t], atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("name", ["gpt2", "llama-untied-bias"])
def test_a_peft_classifier_scores_through_its_trained_head(name):
    """A PEFT sequence classifier (PPO's LoRA value model) trains a copy of its head (peft's modules_to_save): the
    lean scores read that copy, and with the adapter off the original head."""
    model, (ids, mask) = adapted(name, "classifier"), batch()
    with torch.no_grad():
        want = hf_logits(model, ids, mask)
        with model.disable_adapter():
            base = hf_logits(model, ids, mask)
        for rows in (None, 27):
            torch.testing.assert_close(LeanForward(model, rows).scores(ids, mask), want, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(LeanForward(AdapterOff(model), rows).scores(ids, mask), base,
                                       atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("lora", [dict(lora_dropout=0.1), dict(use_dora=True)])
def test_lora_layers_the_lean_paths_cannot_read_keep_the_hf_forward(lora):
    model = adapted("llama-untied-bias", **lora)
    assert lean_forward(model) is None
    assert isinstance(make_decoder(model, 2, 8), HFDecoder)
    merged = adapted("llama-untied-bias")
    merged.merge_adapter()  # the base weights already hold the adapter
    assert lean_forward(merged) is None
