"""Reward adapters: callables, import strings, HF classifier folders, weighted sums, and their errors."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForSequenceClassification, GPT2Config, GPT2ForSequenceClassification

from rewards import RewardError, WeightedSum, as_reward_fn, call_reward
from rewards.hf import SequenceClassifierReward
from tests.conftest import PROMPTS, length_reward
from textenv import TextGenEnv


def test_callable_and_import_string():
    assert as_reward_fn(length_reward) is length_reward
    fn = as_reward_fn("tests.conftest:length_reward")
    assert fn is length_reward
    with pytest.raises(ValueError, match="no attribute 'nope'"):
        as_reward_fn("tests.conftest:nope")
    with pytest.raises(ValueError, match="cannot import module 'no_such_pkg.mod'"):
        as_reward_fn("no_such_pkg.mod:fn")
    with pytest.raises(TypeError, match="names a list"):
        as_reward_fn("tests.conftest:PROMPTS")
    with pytest.raises(TypeError, match=r"got 3 \(int\)"):
        as_reward_fn(3)


def test_weighted_sum():
    def one(p, c):
        return [1.0] * len(c)

    total = WeightedSum([(length_reward, 0.5), (one, -2.0)])
    assert total(["p", "q"], ["abcd", ""]) == [0.0, -2.0]
    assert as_reward_fn({"tests.conftest:length_reward": 2.0})(["p"], ["abc"]) == [6.0]
    with pytest.raises(ValueError, match="weight nan"):
        WeightedSum([(one, float("nan"))])
    with pytest.raises(RewardError, match="returned 1 scores for 2 completions"):
        WeightedSum([(lambda p, c: [1.0], 1.0)])(["a", "b"], ["a", "b"])


def test_call_reward_accepts_numpy_and_ints_and_rejects_bools():
    import numpy as np

    assert call_reward(lambda p, c: [np.float32(0.5), 2], ["a", "b"], ["x", "y"]) == [0.5, 2.0]
    with pytest.raises(RewardError, match=r"True \(bool\) at index 1"):
        call_reward(lambda p, c: [1.0, True], ["a", "b"], ["x", "y"])
    with pytest.raises(RewardError, match="inf at index 0"):
        call_reward(lambda p, c: [float("inf")], ["a"], ["x"])


@pytest.fixture
def classifier_folder(tmp_path, tokenizer):
    def save(num_labels, id2label=None):
        config = GPT2Config(
            n_layer=1, n_head=2, n_embd=32, vocab_size=len(tokenizer), n_positions=64, num_labels=num_labels,
            pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, id2label=id2label,
        )
        torch.manual_seed(0)
        model = GPT2ForSequenceClassification(config)
        folder = tmp_path / f"clf{num_labels}"
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        return folder, model

    return save


def test_hf_classifier_folder_as_reward(classifier_folder, tokenizer):
    folder, model = classifier_folder(2, {0: "NEGATIVE", 1: "POSITIVE"})
    with pytest.raises(ValueError, match="2 labels .*pass label="):
        as_reward_fn(str(folder))
    with pytest.raises(ValueError, match="'JOY' is not one of"):
        as_reward_fn(str(folder), label="JOY")
    fn = as_reward_fn(str(folder), label="POSITIVE", batch_size=2)
    prompts, completions = ["the film was", "a", "the book was"], [" good.", " bad and slow.", ""]
    scores = fn(prompts, completions)
    model.eval()
    for p, c, s in zip(prompts, completions, scores):  # each alone, unpadded, equals the batched, padded score
        ids = torch.tensor([tokenizer(p + c)["input_ids"]])
        assert s == pytest.approx(model(input_ids=ids).logits[0, 1].item(), abs=1e-5)
    # a plain transformers load of the same folder agrees: the folder is all there is
    plain = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    ids = torch.tensor([tokenizer("the film was good.")["input_ids"]])
    assert fn(["the film was"], [" good."])[0] == pytest.approx(plain(input_ids=ids).logits[0, 1].item(), abs=1e-5)


def test_reward_model_folder_in_env(classifier_folder, tokenizer):
    folder, _ = classifier_folder(1)
    env = TextGenEnv(prompts=PROMPTS, tokenizer=tokenizer, reward_fn=str(folder), max_new_tokens=3)
    env.reset(seed=0)
    _, reward, terminated, _, info = env.step(tokenizer.eos_token_id)
    assert terminated and isinstance(reward, float)
    assert reward == pytest.approx(as_reward_fn(str(folder))([info["prompt"]], [info["response"]])[0])
    assert isinstance(env.setup.reward_fn, SequenceClassifierReward)


def test_an_env_whose_reward_is_a_gpt2_rm_folder_pickles_and_copies(classifier_folder, tokenizer):
    """The RM scores on oneDNN-packed weights (no storage to pickle): a cache, dropped on pickling and rebuilt on
    the copy's first call, so pickle and deepcopy (what an async vector env or a worker process does) work and the
    copies pay the same rewards."""
    import copy
    import pickle

    folder, _ = classifier_folder(1)
    kwargs = dict(prompts=PROMPTS, tokenizer=tokenizer, reward_fn=str(folder), max_new_tokens=3)
    env = TextGenEnv(**kwargs)

    def score(e) -> float:
        e.reset(seed=0)
        return e.step(tokenizer.eos_token_id)[1]

    want = score(env)  # scored once: the packed weights exist now
    assert env.setup.reward_fn._packed is not None
    for clone in (pickle.loads(pickle.dumps(env)), copy.deepcopy(env)):
        assert score(clone) == pytest.approx(want, abs=1e-6)


def test_an_over_long_input_keeps_the_classifiers_special_tokens(tmp_path):
    """(#21 item 12) A BERT classifier with 16 positions scores a longer text on its last tokens with [CLS] and
    [SEP] kept, as its own left truncation would, not on a cut that lost [CLS]."""
    import copy

    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    words = ["the", "film", "was", "good", "bad", "and", "slow", "fun", "long", "plot"]
    (tmp_path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    tok = BertTokenizerFast(vocab_file=str(tmp_path / "vocab.txt"))
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(vocab_size=len(tok), hidden_size=16, num_hidden_layers=1,
                                                     num_attention_heads=2, intermediate_size=32,
                                                     max_position_embeddings=16, num_labels=1)).eval()
    fn = SequenceClassifierReward(model, tok, max_length=16)
    prompt, completion = "the film was", " good and fun and slow and long and bad and fun and good plot"
    own = copy.deepcopy(tok)
    own.truncation_side = "left"
    ids = own(prompt + completion, truncation=True, max_length=16, return_tensors="pt")["input_ids"]
    assert ids[0, 0] == tok.cls_token_id and ids[0, -1] == tok.sep_token_id and ids.shape[1] == 16
    with torch.no_grad():
        want = model(input_ids=ids).logits[0, 0].item()
    assert fn([prompt], [completion])[0] == pytest.approx(want, abs=1e-6)
    assert tok.truncation_side == "right"  # the caller's tokenizer is untouched
