"""Model loading helpers: the fused GELU computes what GPT-2's Python GELU computes."""

from __future__ import annotations

import torch
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.activations import NewGELUActivation

from textenv.models import fuse_gelu, load_causal_lm


def test_fuse_gelu_keeps_the_function(tmp_path):
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_positions=16, n_embd=32, n_layer=2, n_head=2)).eval()
    assert sum(type(m) is NewGELUActivation for m in model.modules()) == 2
    x = torch.randint(0, 50, (3, 10))
    with torch.no_grad():
        before = model(input_ids=x).logits
        after = fuse_gelu(model)(input_ids=x).logits
    assert not any(type(m) is NewGELUActivation for m in model.modules())
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)
    model.save_pretrained(tmp_path)  # the saved config still says gelu_new, so plain transformers loads the same model
    assert GPT2LMHeadModel.from_pretrained(tmp_path).config.activation_function == "gelu_new"
    assert not any(type(m) is NewGELUActivation for m in load_causal_lm(tmp_path).modules())
