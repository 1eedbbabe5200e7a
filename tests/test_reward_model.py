"""Stage 3: comparisons (simulated annotator, real preference files) and the reward model trainer."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from transformers import (
    AutoModelForSequenceClassification,
    BertConfig,
    BertForSequenceClassification,
    LlamaConfig,
    LlamaForSequenceClassification,
)

import agents.reward_model as rm_module
from agents.comparisons import CollectConfig, annotate, collect_comparisons, gold_agreement
from agents.preferences import load_preferences
from agents.reward_model import (
    RMConfig,
    fold_normalization,
    load_rm_init,
    ranking_loss,
    ranking_pairs,
    score_texts,
    train_reward_model,
)
from rewards.hf import SequenceClassifierReward
from textenv.models import build_model

TEXTS = ["the film was good and fun.", "the show was awful", "a", "the book was fine and warm and long and slow."]


@pytest.fixture(scope="module")
def sft_dir(tokenizer, tmp_path_factory):
    """A tiny GPT-2 saved as if it were the SFT policy."""
    folder = tmp_path_factory.mktemp("sft")
    build_model("tiny", tokenizer, seed=0).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_ranking_loss_matches_hand_computed_value():
    # K = 3 scores [1, 0, -1] ranked in that order: pairs (1, 0), (1, -1), (0, -1), margins [1, 2, 1];
    # -log sigmoid(1) = 0.3132617, -log sigmoid(2) = 0.1269280 -> (2 * 0.3132617 + 0.1269280) / 3 = 0.2511505
    winners, losers, prompt = ranking_pairs([[0, 1, 2]])
    assert (ranking_loss(torch.tensor([1.0, 0.0, -1.0]), winners, losers, prompt).item()
            == pytest.approx(0.2511505, abs=1e-6))
    # each prompt weighs the same whatever its number of pairs: add a K = 2 prompt with a tie (loss log 2),
    # listed worst first (ranking [1, 0]); its responses sit at offset 3 of the flat score vector
    winners, losers, prompt = ranking_pairs([[0, 1, 2], [1, 0]])
    assert winners.tolist() == [0, 0, 1, 4] and losers.tolist() == [1, 2, 2, 3] and prompt.tolist() == [0, 0, 0, 1]
    loss = ranking_loss(torch.tensor([1.0, 0.0, -1.0, 5.0, 5.0]), winners, losers, prompt)
    assert loss.item() == pytest.approx((0.2511505 + math.log(2)) / 2, abs=1e-6)


def test_annotator_noise_follows_bradley_terry():
    rng = np.random.default_rng(0)
    gold = np.array([0.3, 0.1, -0.2, 0.5, 0.45])
    for _ in range(50):  # temperature 0: the gold order, every time
        assert annotate(gold, 0.0, rng).tolist() == [3, 4, 0, 1, 2]
    assert sorted(annotate(np.zeros(4), 0.0, rng).tolist()) == [0, 1, 2, 3]  # ties: any order, still a permutation
    T, n = 0.5, 20000
    above = np.zeros((5, 5))  # above[a, b]: how often a was ranked above b
    for _ in range(n):
        position = np.argsort(annotate(gold, T, rng))  # position[i]: rank of response i
        above += position[:, None] < position[None, :]
    theory = 1 / (1 + np.exp(-(gold[:, None] - gold[None, :]) / T))  # sigmoid((g_a - g_b) / T)
    off_diagonal = ~np.eye(5, dtype=bool)
    assert np.abs(above / n - theory)[off_diagonal].max() < 0.015
    rows = [{"gold": gold.tolist(), "ranking": annotate(gold, T, rng).tolist()} for _ in range(2000)]
    measured, expected, _ = gold_agreement(rows, T)
    # disagrees about a third of the time
    assert 0.6 < expected < 0.7 and measured == pytest.approx(expected, abs=0.015)


def test_left_and_right_padding_give_the_same_score(sft_dir, tokenizer):
    model = load_rm_init(str(sft_dir), tokenizer)
    prompts = ["", "the film", "", "I think that the show"]
    right = score_texts(model, tokenizer, prompts, TEXTS, side="right")
    left = score_texts(model, tokenizer, prompts, TEXTS, side="left")
    alone = torch.cat([score_texts(model, tokenizer, [p], [t]) for p, t in zip(prompts, TEXTS)])  # no padding at all
    assert torch.allclose(left, right, atol=1e-5) and torch.allclose(alone, right, atol=1e-5)
    assert right.std() > 0


@pytest.mark.parametrize("gain", [False, True])
def test_normalisation_is_folded_into_the_saved_weights(sft_dir, tokenizer, tmp_path, gain):
    model = load_rm_init(str(sft_dir), tokenizer)
    torch.nn.init.normal_(model.score.weight, std=1.0, generator=torch.Generator().manual_seed(0))
    prompts = ["the film was", "the show was", "a", "the book was"] * 2
    texts = TEXTS + [" good", " bad", " fine", "!"]
    before = score_texts(model, tokenizer, prompts, texts)
    fold_normalization(model, before.mean().item(), before.std().item() if gain else 1.0)
    after = score_texts(model, tokenizer, prompts, texts)
    assert after.mean().item() == pytest.approx(0.0, abs=1e-4)
    assert after.std().item() == pytest.approx(1.0 if gain else before.std().item(), rel=1e-4)
    assert model.score.bias is None  # GPT-2's head has no bias: the shift went through ln_f
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    plain = AutoModelForSequenceClassification.from_pretrained(tmp_path)  # what `reward_fn=folder` loads
    assert torch.allclose(score_texts(plain, tokenizer, prompts, texts), after, atol=1e-5)
    assert np.allclose(SequenceClassifierReward(str(tmp_path))(prompts, texts), after.numpy(), atol=1e-5)


def test_normalisation_goes_into_the_head_bias_when_there_is_one(tokenizer):
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                        num_attention_heads=2, num_labels=1, pad_token_id=tokenizer.pad_token_id)
    model = BertForSequenceClassification(config).eval()
    prompts = ["the film was", "a", "the show was", "the book was"]
    before = score_texts(model, tokenizer, prompts, TEXTS)
    fold_normalization(model, before.mean().item(), before.std().item())
    after = score_texts(model, tokenizer, prompts, TEXTS)
    assert after.mean().item() == pytest.approx(0.0, abs=1e-5) and after.std().item() == pytest.approx(1.0, rel=1e-4)


def test_normalisation_without_any_bias_keeps_the_shift_in_the_config(tokenizer, tmp_path):
    """A Llama reward model (bias-free head after an RMSNorm) folds the gain into its head and keeps the shift in its
    config; the reward adapter, handed the model or its saved folder, scores the normalised reward."""
    from rewards.hf import SequenceClassifierReward

    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_labels=1, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(config).eval()
    prompts = ["the film was", "a", "the show was", "the book was"]
    before = torch.tensor(SequenceClassifierReward(model, tokenizer)(prompts, TEXTS))
    for mean, std in [(before.mean().item(), before.std().item()), (0.5, 2.0)]:  # twice: the shifts compose
        fold_normalization(model, mean, std)
    after = torch.tensor(SequenceClassifierReward(model, tokenizer)(prompts, TEXTS))
    want = ((before - before.mean()) / before.std() - 0.5) / 2.0
    torch.testing.assert_close(after, want, atol=1e-5, rtol=1e-5)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    torch.testing.assert_close(torch.tensor(SequenceClassifierReward(str(tmp_path))(prompts, TEXTS)), want,
                               atol=1e-5, rtol=1e-5)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_preference_layouts_load_and_bad_rows_are_counted(tmp_path):
    trl = write_jsonl(tmp_path / "trl.jsonl", [
        {"prompt": "The film was", "chosen": " great.", "rejected": " dull."},
        {"prompt": "The food was", "chosen": " fine.", "rejected": " fine."},  # identical
        {"prompt": "The hotel was", "chosen": " clean.", "rejected": ""},  # empty response
        {"prompt": "The book was", "chosen": " long."},  # missing field
    ])
    p = load_preferences(trl)
    assert p.layout == "trl" and p.n_source_rows == 4
    assert p.rows == [{"prompt": "The film was", "responses": [" great.", " dull."], "ranking": [0, 1]}]
    assert p.skipped == {"identical_responses": 1, "empty_response": 1, "missing_field": 1}

    import pandas as pd

    hh = pd.DataFrame({
        "chosen": ["\n\nHuman: Hi there\n\nAssistant: Hello! How can I help?", "The film was great fun", "same"],
        "rejected": ["\n\nHuman: Hi there\n\nAssistant: Go away.", "The film was grim", "same"],
    })
    hh.to_parquet(tmp_path / "hh.parquet")
    hh.to_csv(tmp_path / "hh.csv", index=False)
    for path in (tmp_path / "hh.parquet", tmp_path / "hh.csv"):
        p = load_preferences(path)
        assert p.layout == "hh" and p.skipped == {"identical_responses": 1}
        assert p.rows[0] == {"prompt": "\n\nHuman: Hi there\n\nAssistant:",
                             "responses": [" Hello! How can I help?", " Go away."], "ranking": [0, 1]}
        assert p.rows[1] == {"prompt": "The film was", "responses": [" great fun", " grim"], "ranking": [0, 1]}

    ranked = write_jsonl(tmp_path / "ranked.jsonl", [
        {"prompt": "a", "responses": ["x", "y", "x"], "ranking": [2, 1, 0], "gold": [0.5, 0.1, 0.5]},  # copies merged
        {"prompt": "b", "responses": ["z"], "ranking": [0], "gold": [0.0]},
    ])
    p = load_preferences(ranked)
    assert p.rows == [{"prompt": "a", "responses": ["x", "y"], "ranking": [0, 1], "gold": [0.5, 0.1]}]
    assert p.skipped == {"one_response": 1}


def test_unusable_preference_data_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="one response per prompt"):
        load_preferences(write_jsonl(tmp_path / "sft.jsonl", [{"prompt": "a", "response": "b"}]))
    with pytest.raises(ValueError, match="one response per prompt"):
        load_preferences(write_jsonl(tmp_path / "k1.jsonl", [{"prompt": "a", "responses": ["b"], "ranking": [0]}] * 3))
    with pytest.raises(ValueError, match="no usable comparison"):
        load_preferences(write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "a", "chosen": "b", "rejected": "b"}]))


def synthetic_preferences(path, n=96):
    """The labeller prefers "good" to "bad": learnable by a tiny model in a few steps."""
    rng = np.random.default_rng(0)
    subjects = ["film", "movie", "book", "song", "show", "play"]
    rows = []
    for i in range(n):
        s, e = subjects[i % 6], ["fun", "slow", "long", "warm"][rng.integers(4)]
        rows.append({"prompt": f"the {s} {i} was", "chosen": f" good and {e}.", "rejected": f" bad and {e}."})
    return write_jsonl(path, rows)


def rm_config(data, out_dir, sft_dir, **kw):
    return RMConfig(out_dir=str(out_dir), data=str(data), model=str(sft_dir), task=None, batch_size=8, lr=3e-3,
                    epochs=3, log_every=2, eval_every=6, save_every=6, **kw)


def test_short_training_lowers_the_loss_and_resumes_exactly(sft_dir, tmp_path, monkeypatch):
    data = synthetic_preferences(tmp_path / "prefs.jsonl")
    folder = train_reward_model(rm_config(data, tmp_path / "rm", sft_dir))
    summary = json.loads((tmp_path / "rm" / "summary.json").read_text())
    losses = [m["train/loss"] for m in map(json.loads, (tmp_path / "rm" / "metrics.jsonl").read_text().splitlines())
              if "train/loss" in m]
    assert losses[-1] < 0.5 * losses[0] and summary["heldout_accuracy"] > 0.9
    assert summary["annotator_ceiling"] is None and summary["steps"] == 3 * (86 // 8)
    assert summary["normalization"]["mean"] != 0.0

    # interrupted right after its first checkpoint, then rerun: the same final weights as the straight run
    real_save = rm_module.save_checkpoint

    def save_then_crash(*args, **kwargs):
        real_save(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(rm_module, "save_checkpoint", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        train_reward_model(rm_config(data, tmp_path / "resumed", sft_dir))
    monkeypatch.setattr(rm_module, "save_checkpoint", real_save)
    resumed = train_reward_model(rm_config(data, tmp_path / "resumed", sft_dir))
    a = AutoModelForSequenceClassification.from_pretrained(folder).state_dict()
    b = AutoModelForSequenceClassification.from_pretrained(resumed).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_collect_then_train_on_the_sentiment_task(sft_dir, tmp_path):
    cfg = CollectConfig(out_dir=str(tmp_path / "cmp"), policy=str(sft_dir), num_prompts=40, k=3, prompts_per_batch=16,
                        annotator_temperature=0.1)
    data = collect_comparisons(cfg)
    summary = json.loads((tmp_path / "cmp" / "summary.json").read_text())
    assert summary["kept"] + summary["skipped"] == 40 and summary["kept"] > 30
    rows = [json.loads(line) for line in (tmp_path / "cmp" / "comparisons.jsonl").read_text().splitlines()]
    assert len(rows) == summary["kept"] and all(len(r["responses"]) == 3 for r in rows)
    assert load_preferences(data).layout == "ranked"
    assert collect_comparisons(cfg) == data  # complete: nothing to do
    rm = RMConfig(out_dir=str(tmp_path / "rm"), data=str(tmp_path / "cmp"), model=str(sft_dir), batch_size=8,
                  eval_fraction=0.2, n_eval_samples=20)
    train_reward_model(rm)
    s = json.loads((tmp_path / "rm" / "summary.json").read_text())
    for key in ("heldout_accuracy", "annotator_ceiling", "accuracy_over_ceiling", "fresh_spearman", "heldout_loss"):
        assert math.isfinite(s[key]), key
    assert 0.5 <= s["annotator_ceiling"] <= 1.0
