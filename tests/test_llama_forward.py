"""The lean paths over the Llama family's trunk (textenv/models/llama.py) against HF's forward: logits, scores and
gradients at the real positions under left and right padding, shared prompts, and the decoder, for Llama (tied and
untied, with biases, with Llama 3's and YaRN's RoPE scaling), Qwen2 (qkv bias), Qwen3 (q/k norms, a head_dim that
is not hidden / heads) and Mistral (no sliding window)."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    MistralConfig,
    MistralForCausalLM,
    MistralForSequenceClassification,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen2ForSequenceClassification,
    Qwen3Config,
    Qwen3ForCausalLM,
    Qwen3ForSequenceClassification,
)

from tests.test_gpt2_forward import PAD, assert_same_gradients, batch, grouped_batch, hf_logits
from textenv.models.decoding import HFDecoder, make_decoder
from textenv.models.lean import LeanDecoder, LeanForward, fast_path, lean_forward
from textenv.models.llama import LlamaTrunk
from textenv.models.tokens import position_ids_from_mask

SIZE = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, pad_token_id=PAD, bos_token_id=1, eos_token_id=2)
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8}
YARN_ROPE = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 16}

# name -> (config class, causal LM class, sequence classifier class, config overrides)
FAMILIES = {
    "llama-tied": (LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification, dict(tie_word_embeddings=True)),
    "llama-untied-bias": (LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification,
                          dict(tie_word_embeddings=False, attention_bias=True, mlp_bias=True)),
    "llama3-rope-mha": (LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification,
                        dict(rope_parameters=LLAMA3_ROPE, num_key_value_heads=4)),
    "llama-yarn-mqa": (LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification,
                       dict(rope_parameters=YARN_ROPE, num_key_value_heads=1)),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, Qwen2ForSequenceClassification, dict(tie_word_embeddings=True)),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM, Qwen3ForSequenceClassification, dict(head_dim=16)),
    "mistral": (MistralConfig, MistralForCausalLM, MistralForSequenceClassification, dict(sliding_window=None)),
}


def make(family: str, kind: str = "lm", **kw):
    config_class, lm_class, classifier_class, overrides = FAMILIES[family]
    config = config_class(**{**SIZE, **overrides, **kw})
    torch.manual_seed(0)
    model = (lm_class if kind == "lm" else classifier_class)(config).eval()
    with torch.no_grad():  # HF initialises norms to 1 and biases to 0: random ones test that each is applied
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.2 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_and_gradients_equal_hf_at_real_positions(family):
    model, (ids, mask) = make(family), batch()
    assert fast_path(model) is LlamaTrunk
    keep = slice(3, 9)  # the last block computes only these positions
    ours = LeanForward(model).logits(ids, mask, keep)  # (B, K, V)
    want = hf_logits(model, ids, mask)[:, keep]
    real = mask[:, keep].bool()
    torch.testing.assert_close(ours[real], want[real], atol=1e-5, rtol=1e-5)
    assert_same_gradients(model, ours, want, real)
    with torch.no_grad():  # frozen: packed weights, q/k/v and gate/up fused
        packed = LeanForward(model, pack_rows=40).logits(ids, mask, keep)
    torch.testing.assert_close(packed[real], want.detach()[real], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["llama-tied", "qwen3", "mistral"])
def test_scores_equal_hf_sequence_classifier(family):
    model, (ids, mask) = make(family, "classifier", num_labels=2), batch()
    with torch.no_grad():
        torch.testing.assert_close(LeanForward(model).scores(ids, mask), hf_logits(model, ids, mask),
                                   atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(LeanForward(model, pack_rows=40).scores(ids, mask), hf_logits(model, ids, mask),
                                   atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["llama-untied-bias", "qwen3"])
def test_shared_prompts_run_once_with_the_same_numbers(family):
    model, (ids, mask), P = make(family), grouped_batch(), 5
    real = mask[:, P - 1 : -1].bool()
    want = hf_logits(model, ids, mask)[:, P - 1 : -1]
    lean = LeanForward(model)
    shared = lean.apply_head(lean.response_hidden(ids, mask, P))  # each of the 3 prompts runs once
    torch.testing.assert_close(shared[real], want[real], atol=1e-5, rtol=1e-5)
    assert_same_gradients(model, shared, want, real)


def left_padded(rows: list[list[int]], P: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids, mask = torch.full((len(rows), P), PAD), torch.zeros(len(rows), P, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, P - len(r) :], mask[i, P - len(r) :] = torch.tensor(r), 1
    return ids, mask


@pytest.mark.parametrize("family", FAMILIES)
def test_decoder_prefill_steps_and_chunks_equal_an_unpadded_hf_forward(family):
    """A shared prompt, three decode steps, then a chunk that only two rows get (a multi-turn env's replies, of two
    lengths), then a step with the rows at different slots: every row's logits are those of its own stream
    through HF's forward, unpadded and uncached."""
    model = make(family)
    prompts = [[5, 6, 7, 8, 9], [11, 12], [5, 6, 7, 8, 9], [13]]  # rows 0 and 2 share a prompt
    steps = [[20, 21, 22], [30, 31, 32], [50, 51, 52], [40, 41, 42]]
    chunk, chunk_mask = torch.tensor([[60, 61, 62], [0, 0, 0], [70, 0, 0], [0, 0, 0]]), torch.tensor(
        [[1, 1, 1], [0, 0, 0], [1, 0, 0], [0, 0, 0]])
    last = [80, 81, 82, 83]
    decoder = make_decoder(model, batch_size=4, max_len=8)  # grows past 8 slots on the way
    assert isinstance(decoder, LeanDecoder)
    ids, mask = left_padded(prompts, 6)
    with torch.no_grad():
        got = [decoder.prefill(ids, mask)]
        got += [decoder.step(torch.tensor([s[t] for s in steps])) for t in range(3)]
        after_chunk = decoder.extend(chunk, chunk_mask)
        after_last = decoder.step(torch.tensor(last))
        for i, prompt in enumerate(prompts):
            reply = chunk[i][chunk_mask[i] == 1].tolist()
            stream = prompt + steps[i] + reply + [last[i]]
            full = model(input_ids=torch.tensor([stream])).logits[0]  # (len, V)
            for t in range(4):
                torch.testing.assert_close(got[t][i], full[len(prompt) - 1 + t], atol=2e-5, rtol=1e-4)
            if reply:
                torch.testing.assert_close(after_chunk[i], full[len(stream) - 2], atol=2e-5, rtol=1e-4)
            torch.testing.assert_close(after_last[i], full[-1], atol=2e-5, rtol=1e-4)


def test_lean_path_only_where_exact():
    hooked = make("llama-tied")
    hooked.register_forward_hook(lambda m, args, out: out)  # a hook may edit the output: the HF forward must run
    swapped = make("qwen2")
    swapped.model.layers[1].mlp.up_proj = torch.nn.Identity()  # e.g. an adapter layer swapped in
    refused = [make("mistral", sliding_window=16),  # a window shorter than the context masks far keys
               make("qwen2", use_sliding_window=True, sliding_window=16, max_window_layers=1),
               make("llama-tied", hidden_act="gelu"), make("llama-tied", attention_dropout=0.1), hooked, swapped]
    for model in refused:
        assert lean_forward(model) is None
        assert isinstance(make_decoder(model, 2, 8), HFDecoder)
    assert lean_forward(make("mistral", sliding_window=64)) is not None  # a window as long as the context: exact
    with pytest.raises(ValueError, match="not supported by LeanDecoder"):
        LeanDecoder(make("llama-tied", "classifier"), 1, 4)  # a classifier does not decode


def test_positions_count_real_tokens_under_left_padding():
    """A left-padded row gets the logits of the same row unpadded (its RoPE positions start at 0 at its first
    real token), which HF's forward gives only with explicit position_ids."""
    model = make("qwen3")
    ids, mask = left_padded([[5, 6, 7, 8], [9, 10]], 4)
    with torch.no_grad():
        ours = LeanForward(model).logits(ids, mask, slice(0, 4))
        alone = model(input_ids=torch.tensor([[9, 10]])).logits[0]
    torch.testing.assert_close(ours[1, 2:], alone, atol=1e-5, rtol=1e-5)
    assert position_ids_from_mask(mask)[1].tolist() == [0, 0, 0, 1]
