"""DPO: the loss against hand-computed values, response-only sequence log-probs, a smoke run, resume, bad input."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

import agents.dpo
from agents.dpo import DPOConfig, collate, dpo, dpo_loss, encode_triple, preference_pairs, sequence_logps
from agents.run import RunLogger, load_checkpoint
from tests.conftest import PROMPTS, WORDS
from textenv.models import build_model
from textenv.prompts import tokenize_prompts

RESPONSES = [f" {v} and {e}." for v in WORDS["verdict"] for e in WORDS["extra"][:2]]  # 12 texts


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One thread: the tiny model gains nothing from a 2nd one on a shared machine (see test_pretrain_sft.py)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def files(tmp_path_factory, tokenizer):
    """A tiny 'SFT' policy folder (model + tokenizer) and a ranked comparisons file: 8 prompts x K=3 responses."""
    root = tmp_path_factory.mktemp("dpo")
    build_model("tiny", tokenizer, seed=0).save_pretrained(root / "sft")
    tokenizer.save_pretrained(root / "sft")
    rows = [{"prompt": p, "responses": [RESPONSES[i % 12], RESPONSES[(i + 5) % 12], RESPONSES[(i + 7) % 12]],
             "ranking": [[0, 1, 2], [2, 0, 1], [1, 2, 0]][i % 3]} for i, p in enumerate(PROMPTS)]
    (root / "comparisons.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def tiny_config(files, out_dir, **kw) -> DPOConfig:
    base = dict(policy=str(files / "sft"), comparisons=str(files / "comparisons.jsonl"), out_dir=str(out_dir),
                batch_size=4, max_steps=6, lr=1e-3, warmup_steps=0, log_every=1, save_every=2)
    return DPOConfig(**{**base, **kw})


def read_metrics(out_dir) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------- the loss, by hand

PC, PR, RC, RR = [-3.0, -10.0, -4.0], [-5.0, -9.0, -4.0], [-4.0, -9.5, -5.0], [-4.5, -9.5, -3.0]
H = [(pc - rc) - (pr - rr) for pc, pr, rc, rr in zip(PC, PR, RC, RR)]  # [1.5, -1.0, 2.0]


def loss_of(**kw):
    return dpo_loss(*(torch.tensor(x) for x in (PC, PR, RC, RR)), **kw)


def test_sigmoid_loss_and_rewards_by_hand():
    def log_sigmoid(x):
        return -math.log(1 + math.exp(-x))
    loss, chosen, rejected = loss_of(beta=0.5)
    assert loss.item() == pytest.approx(sum(-log_sigmoid(0.5 * h) for h in H) / 3, rel=1e-6)
    assert loss.item() == pytest.approx((0.38687101 + 0.97407698 + 0.31326169) / 3, rel=1e-6)  # log(1 + e^(-h/2))
    assert chosen.tolist() == pytest.approx([0.5, -0.25, 0.5])  # beta * (policy - ref)
    assert rejected.tolist() == pytest.approx([-0.25, 0.25, -0.5])


def test_label_smoothing_is_conservative_dpo_by_hand():
    def log_sigmoid(x):
        return -math.log(1 + math.exp(-x))
    loss, _, _ = loss_of(beta=0.5, label_smoothing=0.2)
    want = sum(-0.8 * log_sigmoid(0.5 * h) - 0.2 * log_sigmoid(-0.5 * h) for h in H) / 3
    assert loss.item() == pytest.approx(want, rel=1e-6)
    assert loss.item() > loss_of(beta=0.5)[0].item()  # the confident rows now pay for possibly flipped labels


def test_ipo_loss_by_hand():
    loss, _, _ = loss_of(beta=0.5, loss_type="ipo")  # (h - 1 / (2 * 0.5))^2 = (h - 1)^2
    assert loss.item() == pytest.approx((0.25 + 4.0 + 1.0) / 3)


def test_policy_equal_to_reference_gives_log2_and_pulls_chosen_up():
    pc, pr = torch.tensor([-3.0, -7.0], requires_grad=True), torch.tensor([-5.0, -2.0], requires_grad=True)
    loss, chosen, rejected = dpo_loss(pc, pr, pc.detach(), pr.detach(), beta=0.1)
    assert loss.item() == pytest.approx(math.log(2)) and chosen.tolist() == rejected.tolist() == [0.0, 0.0]
    loss.backward()
    # d loss / d logp_w = -beta * sigmoid(-beta h) / B = -0.1 * 0.5 / 2: gradient descent raises logp_w, lowers logp_l
    assert pc.grad.tolist() == pytest.approx([-0.025, -0.025]) and pr.grad.tolist() == pytest.approx([0.025, 0.025])


def test_one_step_on_a_model_widens_the_margin(files, tokenizer):
    model = AutoModelForCausalLM.from_pretrained(files / "sft")
    triples = [encode_triple(tokenizer, "the film was", " good and fun.", " awful.", DPOConfig()),
               encode_triple(tokenizer, "I think that the show", " bad.", " fine and warm.", DPOConfig())]
    batch = collate(triples, tokenizer.pad_token_id)
    with torch.no_grad():
        ref = sequence_logps(model, batch, 1.0).view(2, -1)  # (2, B)
    logps = sequence_logps(model, batch, 1.0).view(2, -1)
    loss, _, _ = dpo_loss(logps[0], logps[1], ref[0], ref[1], beta=0.1)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)
    loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            p -= 1e-2 * p.grad
        after = sequence_logps(model, batch, 1.0).view(2, -1)
    assert ((after[0] - after[1]) > (ref[0] - ref[1])).all()  # first order: the margin grows by lr beta/2 |grad h|^2


# ---------------------------------------------------------------- data and sequence log-probs


def test_pairs_from_rankings():
    row = {"prompt": "p", "responses": ["a", "b", "c"], "ranking": [2, 0, 1]}  # c > a > b
    assert preference_pairs([row], "best_vs_worst") == [("p", "c", "b")]
    assert preference_pairs([row], "all") == [("p", "c", "a"), ("p", "c", "b"), ("p", "a", "b")]


def test_encoding_matches_the_env_and_sft(tokenizer):
    cfg = DPOConfig(max_prompt_tokens=3, max_response_tokens=64)
    prompt, chosen, rejected = encode_triple(tokenizer, "I think that the show", " good.", "", cfg)
    ids, mask = tokenize_prompts(["I think that the show"], tokenizer, 3)  # the env: left-truncated, left-padded
    assert prompt == ids[0][mask[0] == 1].tolist() and len(prompt) == 3
    assert chosen == tokenizer(" good.", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert rejected == [tokenizer.eos_token_id]  # an empty response is still a choice: stop at once


def test_padded_batch_logps_equal_unpadded_ones(files, tokenizer):
    model = AutoModelForCausalLM.from_pretrained(files / "sft")
    texts = [("a", " good and fun.", " bad."), ("I think that the show", " dull.", " fine and warm.")]
    triples = [encode_triple(tokenizer, p, w, lo, DPOConfig()) for p, w, lo in texts]
    batch = collate(triples, tokenizer.pad_token_id)  # prompts of 1 and 14 tokens: left padding is exercised
    assert batch["input_ids"].shape[0] == 4
    assert batch["response_mask"].sum().item() == sum(len(t[1]) + len(t[2]) for t in triples)
    with torch.no_grad():
        batched = sequence_logps(model, batch, 1.0)  # (4,): chosen rows, then rejected rows
        alone = []
        for k in (1, 2):
            for t in triples:
                ids = torch.tensor([t[0] + t[k]])  # no padding at all
                logp = torch.log_softmax(model(ids).logits[0, :-1], -1)  # (L - 1, V)
                targets = ids[0, 1:]
                alone.append(logp[torch.arange(len(targets)), targets][len(t[0]) - 1 :].sum().item())
    assert batched.tolist() == pytest.approx(alone, abs=1e-4)


# ---------------------------------------------------------------- training


def test_dpo_smoke_run(files, tmp_path):
    before = AutoModelForCausalLM.from_pretrained(files / "sft").state_dict()
    final = dpo(tiny_config(files, tmp_path / "run"))
    metrics = read_metrics(tmp_path / "run")
    assert [m["step"] for m in metrics] == list(range(1, 7))
    keys = {"losses/dpo_loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
            "charts/lr", "charts/tokens_per_s"}
    assert all(keys <= m.keys() and all(math.isfinite(m[k]) for k in keys) for m in metrics)
    assert metrics[0]["losses/dpo_loss"] == pytest.approx(math.log(2), abs=1e-4)  # policy == reference at step 0
    assert metrics[-1]["rewards/margins"] > 0 and metrics[-1]["losses/dpo_loss"] < math.log(2)  # it learns

    after = AutoModelForCausalLM.from_pretrained(final)  # plain transformers loads it
    params = dict(after.named_parameters())
    assert all(not torch.equal(before[name], params[name]) for name in params), "a parameter did not train"
    assert (final / "tokenizer.json").exists() and not (tmp_path / "run" / "checkpoint").exists()
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["pairs"] == 8 and summary["layout"] == "ranked"
    assert dpo(tiny_config(files, tmp_path / "run")) == final  # complete: a no-op


def test_all_pairs_and_ipo_run(files, tmp_path):
    dpo(tiny_config(files, tmp_path / "run", pairs="all", loss_type="ipo", max_steps=2))
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["pairs"] == 8 * 3


class Crash(Exception):
    pass


def test_resume_after_a_crash_gives_the_same_weights(files, tmp_path, monkeypatch):
    straight = dpo(tiny_config(files, tmp_path / "straight"))

    real_log = RunLogger.log
    def crash_at_step_4(self, step, metrics):  # checkpoint at 2, the line for step 3 already written
        if step == 4:
            raise Crash
        real_log(self, step, metrics)
    with monkeypatch.context() as m:
        m.setattr(RunLogger, "log", crash_at_step_4)
        with pytest.raises(Crash):
            dpo(tiny_config(files, tmp_path / "crashed"))
    assert json.loads((tmp_path / "crashed" / "checkpoint" / "trainer_state.json").read_text())["step"] == 2

    resumed_from = []
    def spy_load(*args):
        state = load_checkpoint(*args)
        resumed_from.append(state["step"])
        return state
    monkeypatch.setattr(agents.dpo, "load_checkpoint", spy_load)
    resumed = dpo(tiny_config(files, tmp_path / "crashed"))
    assert resumed_from == [2]  # a real resume, not a restart

    a = AutoModelForCausalLM.from_pretrained(straight).state_dict()
    b = AutoModelForCausalLM.from_pretrained(resumed).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    def strip(ms):
        return [{k: v for k, v in m.items() if k != "charts/tokens_per_s"} for m in ms]
    assert strip(read_metrics(tmp_path / "crashed")) == strip(read_metrics(tmp_path / "straight"))


# ---------------------------------------------------------------- bad input


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="beta must be > 0, got 0"):
        DPOConfig(beta=0)
    with pytest.raises(ValueError, match="beta must be > 0, got -0.1"):
        loss_of(beta=-0.1)
    with pytest.raises(ValueError, match="loss_type must be one of .*, got 'kto'"):
        DPOConfig(loss_type="kto")
    with pytest.raises(ValueError, match="label_smoothing must be in \\[0, 0.5\\), got 0.5"):
        loss_of(beta=0.1, label_smoothing=0.5)
    with pytest.raises(ValueError, match="label_smoothing=0.1 applies to loss_type='sigmoid' only"):
        DPOConfig(loss_type="ipo", label_smoothing=0.1)
    with pytest.raises(ValueError, match="pairs must be one of .*, got 'random'"):
        DPOConfig(pairs="random")
    with pytest.raises(ValueError, match="temperature must be > 0, got 0"):
        DPOConfig(temperature=0)
