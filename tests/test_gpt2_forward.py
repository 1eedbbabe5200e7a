"""The lean forward over GPT-2's trunk (textenv/models/lean.py, gpt2.py) against HF's: logits, scores and gradients
at the real positions."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel

from rewards.hf import SequenceClassifierReward
from textenv.models.lean import LeanForward, lean_forward
from textenv.models.tokens import position_ids_from_mask

PAD = 0


def config(**kw) -> GPT2Config:
    return GPT2Config(vocab_size=97, n_positions=32, n_embd=32, n_layer=3, n_head=4, resid_pdrop=0.0, embd_pdrop=0.0,
                      attn_pdrop=0.0, pad_token_id=PAD, bos_token_id=1, eos_token_id=2, **kw)


def lm(**kw) -> GPT2LMHeadModel:
    torch.manual_seed(0)
    return GPT2LMHeadModel(config(**kw)).eval()


def classifier(num_labels: int = 1, pad_token_id: int | None = PAD) -> GPT2ForSequenceClassification:
    torch.manual_seed(1)
    c = config(num_labels=num_labels)
    c.pad_token_id = pad_token_id
    return GPT2ForSequenceClassification(c).eval()


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    """(4, 10): unpadded, left-padded by 3, right-padded after 6 tokens, and both."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 97, (4, 10), generator=g)
    mask = torch.ones(4, 10, dtype=torch.long)
    mask[1, :3] = 0
    mask[2, 6:] = 0
    mask[3, :2] = 0
    mask[3, 8:] = 0
    return ids.masked_fill(mask == 0, PAD), mask


def hf_logits(model, ids, mask):
    return model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits


def assert_same_gradients(model, ours: torch.Tensor, want: torch.Tensor, real: torch.Tensor) -> None:
    """The same random-weighted loss over the `real` entries of both outputs: the same gradient on every parameter."""
    weights = torch.randn(want.shape, generator=torch.Generator().manual_seed(2))
    grads = []
    for out in (ours, want):
        model.zero_grad()
        (out * weights)[real].sum().backward(retain_graph=True)
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("activation", ["gelu_new", "gelu_pytorch_tanh", "gelu"])
def test_logits_and_gradients_equal_hf_at_real_positions(activation):
    model, ids, mask = lm(activation_function=activation), *batch()
    keep = slice(3, 9)  # the last block computes only these positions
    real = mask[:, keep].bool()  # (B, K)
    ours = LeanForward(model).logits(ids, mask, keep)  # (B, K, V)
    want = hf_logits(model, ids, mask)[:, keep]
    torch.testing.assert_close(ours[real], want[real], atol=1e-5, rtol=1e-5)

    assert_same_gradients(model, ours, want, real)


def test_one_position_per_row_and_no_padding():
    model = lm()
    ids = torch.randint(3, 97, (3, 8), generator=torch.Generator().manual_seed(3))
    want = model(input_ids=ids).logits  # (3, 8, V): no mask at all takes the causal-only path
    torch.testing.assert_close(LeanForward(model).logits(ids, None, slice(0, 8)), want, atol=1e-5, rtol=1e-5)
    pos = torch.tensor([7, 0, 4])
    got = LeanForward(model).logits(ids, torch.ones_like(ids), pos)  # (3, 1, V)
    torch.testing.assert_close(got[:, 0], want[torch.arange(3), pos], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("activation", ["gelu_new", "gelu"])  # oneDNN's fused GELU post-op, tanh and erf
def test_packed_weights_equal_and_refuse_gradients(activation):
    model, ids, mask = lm(activation_function=activation).requires_grad_(False), *batch()
    real = mask[:, 2:].bool()
    packed = LeanForward(model, pack_rows=40)
    with torch.no_grad():
        torch.testing.assert_close(packed.logits(ids, mask, slice(2, 10))[real],
                                   hf_logits(model, ids, mask)[:, 2:][real], atol=1e-5, rtol=1e-5)
    with pytest.raises(RuntimeError, match="no gradient"):
        packed.logits(ids, mask, slice(2, 10))


@pytest.mark.parametrize("num_labels", [1, 3])
def test_scores_equal_sequence_classifier(num_labels):
    model, (ids, mask) = classifier(num_labels), batch()
    # HF reads the rightmost non-PAD token; rows 2 and 3 end early, so it is not the last position for them
    torch.testing.assert_close(LeanForward(model).scores(ids, mask), hf_logits(model, ids, mask), atol=1e-5, rtol=1e-5)
    # right padding only (what the reward adapter feeds): HF's default positions are the same ones
    torch.testing.assert_close(LeanForward(model).scores(ids[[0, 2]], mask[[0, 2]]),
                               model(input_ids=ids[[0, 2]], attention_mask=mask[[0, 2]]).logits, atol=1e-5, rtol=1e-5)


def test_scores_without_pad_id_as_hf():
    model = classifier(pad_token_id=None)
    ids = torch.randint(3, 97, (1, 6))
    torch.testing.assert_close(LeanForward(model).scores(ids, None), model(input_ids=ids).logits, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="batch sizes > 1"):
        LeanForward(model).scores(torch.randint(3, 97, (2, 6)), None)


def test_only_plain_gpt2_takes_the_lean_path():
    assert lean_forward(lm()) is not None and lean_forward(classifier()) is not None
    assert lean_forward(lm(scale_attn_by_inverse_layer_idx=True)) is None
    hooked = lm()
    hooked.transformer.h[1].mlp.register_forward_hook(lambda m, args, out: out * 2)
    assert lean_forward(hooked) is None
    with pytest.raises(ValueError, match="not supported by LeanForward"):
        LeanForward(hooked)


def test_reward_adapter_scores_as_hf(tmp_path):
    """A folder (frozen, packed) and a model handed in (live weights) both score as the HF forward."""
    from textenv.embedded import default_tokenizer
    from textenv.models import preset_config

    tok = default_tokenizer()
    c = preset_config("tiny", tok)
    c.num_labels = 1
    torch.manual_seed(0)
    model = GPT2ForSequenceClassification(c).eval()
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    prompts, completions = ["The film was", "A", "Long prompt with several words in it"], [" great.", " bad", ""]
    enc = tok([p + r for p, r in zip(prompts, completions)], padding=True, return_tensors="pt")
    with torch.no_grad():
        want = model(**enc).logits[:, 0].tolist()
    folder = SequenceClassifierReward(str(tmp_path))
    assert folder(prompts, completions) == pytest.approx(want, abs=1e-5)
    live = SequenceClassifierReward(model, tok)
    with torch.no_grad():
        model.score.weight.mul_(2)  # the owner trains on: the adapter reads the new weights
    assert live(prompts, completions) == pytest.approx([2 * w for w in want], abs=1e-5)


def grouped_batch(P: int = 5, T: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    """7 rows over 3 prompts (one left-padded), in mixed order; one response ends early (PAD after it)."""
    g = torch.Generator().manual_seed(4)
    prompts = torch.randint(3, 97, (3, P), generator=g)
    pmask = torch.ones(3, P, dtype=torch.long)
    pmask[1, :2] = 0
    group = torch.tensor([0, 0, 1, 2, 1, 1, 0])
    resp = torch.randint(3, 97, (7, T), generator=g)
    rmask = torch.ones(7, T, dtype=torch.long)
    rmask[2, 3:] = 0
    ids = torch.cat([prompts.masked_fill(pmask == 0, PAD)[group], resp.masked_fill(rmask == 0, PAD)], 1)
    return ids, torch.cat([pmask[group], rmask], 1)


def test_shared_prompts_run_once_with_the_same_numbers():
    model, (ids, mask), P = lm(), grouped_batch(), 5
    real = mask[:, P - 1 : -1].bool()  # (B, T) the real tokens among the positions returned
    plain = LeanForward(model).hidden(ids, mask, slice(P - 1, ids.shape[1] - 1))  # every row runs its prompt
    shared = LeanForward(model).response_hidden(ids, mask, P)  # each of the 3 prompts runs once
    torch.testing.assert_close(shared[real], plain[real], atol=1e-5, rtol=1e-5)
    assert_same_gradients(model, shared, plain, real)
    with torch.no_grad():
        packed = LeanForward(model.requires_grad_(False), pack_rows=20).response_hidden(ids, mask, P)
    torch.testing.assert_close(packed[real], plain.detach()[real], atol=1e-5, rtol=1e-5)


def test_response_hidden_is_hf_at_real_positions_without_shared_prompts():
    model, (ids, mask), P = lm(), batch(), 4  # four distinct prompts: the plain forward
    real = mask[:, P - 1 : -1].bool()
    want = hf_logits(model, ids, mask)[:, P - 1 : -1]
    lean = LeanForward(model)
    torch.testing.assert_close(lean.apply_head(lean.response_hidden(ids, mask, P))[real], want[real],
                               atol=1e-5, rtol=1e-5)


def test_onednn_affine_equals_addmm_with_gradients():
    from textenv.models.onednn import Affine as _Affine

    g = torch.Generator().manual_seed(6)
    x = torch.randn(40, 24, generator=g, requires_grad=True)
    weight, bias = (torch.randn(24, 56, generator=g, requires_grad=True),
                    torch.randn(56, generator=g, requires_grad=True))
    out_grad = torch.randn(40, 56, generator=g)
    for transposed in (False, True):  # a Conv1D (in, out) weight, and nn.Linear's (out, in) seen as its transpose
        w = weight if not transposed else weight.t().contiguous().detach().requires_grad_(True)
        affine = _Affine(w if not transposed else w.t(), bias, gelu="tanh", onednn=True)  # on any CPU kind
        assert affine.onednn == torch.backends.mkldnn.is_available()
        got = affine(x)
        want = torch.nn.functional.gelu(torch.addmm(bias, x, w if not transposed else w.t()), approximate="tanh")
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        grads = [torch.autograd.grad(y, (x, w, bias), out_grad) for y in (got, want)]
        for a, b in zip(*grads):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_the_update_multiplies_on_onednn_except_on_intel(monkeypatch):
    """MKL's `mm` on Intel (measured faster there), oneDNN's linear on other CPUs (measured faster on an AMD EPYC);
    an explicit choice wins, and a weight oneDNN cannot take keeps `mm`."""
    from textenv.models import onednn

    w = torch.randn(8, 4)
    for vendor, expected in (("GenuineIntel", False), ("AuthenticAMD", True), ("", True)):
        monkeypatch.setattr(onednn, "cpu_vendor", lambda vendor=vendor: vendor)
        assert onednn.update_on_onednn() is expected
        assert onednn.Affine(w, None).onednn is (expected and torch.backends.mkldnn.is_available())
        forced = onednn.Affine(w, None, onednn=not expected)
        assert forced.onednn is (not expected and torch.backends.mkldnn.is_available())
    assert onednn.Affine(w.double(), None, onednn=True).onednn is False
    monkeypatch.undo()
    if Path("/proc/cpuinfo").exists():  # Linux: the vendor line is read
        assert onednn.cpu_vendor() in Path("/proc/cpuinfo").read_text() and onednn.cpu_vendor().strip()


def test_only_left_padding_needs_a_mask():
    from textenv.models.lean import left_padded, padded_causal_mask

    assert not left_padded(torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]).bool())  # after EOS: plain causal
    assert left_padded(torch.tensor([[0, 1, 1], [1, 1, 0]]).bool())
    mask = padded_causal_mask(torch.tensor([[0, 1, 1], [1, 1, 0]]).bool())  # (2, 3, 3)
    assert mask[0].tolist() == [[True, False, False], [False, True, False], [False, True, True]]  # pad sees itself
    assert mask[1].tolist() == [[True, False, False], [True, True, False], [True, True, True]]
