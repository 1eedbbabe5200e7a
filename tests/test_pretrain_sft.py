"""Stages 1-2 (pretrain, SFT) and their shared plumbing, on the `tiny` preset and small inline data (seconds each)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

import agents.pretrain
import agents.sft
from agents.core import IGNORE, sft_loss
from agents.data import collate, encode_pair
from agents.pretrain import PretrainConfig, pretrain
from agents.run import RunLogger, check_run_dir, config_changes, cosine_schedule, load_checkpoint, save_checkpoint
from agents.sft import SFTConfig, sft
from textenv.models import build_model
from textenv.records import read_records
from textenv.tokenizer import EOS_TOKEN, train_tokenizer

NAMES = ["Anna", "Ben", "Carla", "Dev", "Emma", "Felix"]
VERBS = ["likes", "sees", "finds", "paints", "buys", "carries"]
THINGS = ["a red ball", "the old boat", "a small cat", "the green door", "some bread", "a blue kite"]


def make_docs(n: int = 200, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    def sentence():
        return f"{rng.choice(NAMES)} {rng.choice(VERBS)} {rng.choice(THINGS)}."
    return [" ".join(sentence() for _ in range(rng.randint(3, 8))) for _ in range(n)]


def make_demos(n: int = 240, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    demos = []
    for _ in range(n):
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        demos.append({"prompt": f"Q: {a} + {b} =", "response": f" {a + b}"})
    return demos


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def read_metrics(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny model gains nothing from a 2nd thread, and on a shared, busy machine OpenMP's barriers make two
    threads wait for each other's time slices (10x slower steps); restored afterwards for the other test files."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A text file, a trained tokenizer folder, a demonstrations file and a tiny base model folder."""
    root = tmp_path_factory.mktemp("data")
    docs = make_docs()
    (root / "docs.txt").write_text("\n\n".join(docs))
    tokenizer = train_tokenizer(docs + [d["prompt"] + d["response"] for d in make_demos()], vocab_size=512)
    tokenizer.save_pretrained(root / "tokenizer")
    write_jsonl(root / "demos.jsonl", make_demos())
    build_model("tiny", tokenizer, seed=0).save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    return root


def tiny_pretrain(files: Path, out_dir: Path, **overrides) -> PretrainConfig:
    kwargs = dict(out_dir=str(out_dir), preset="tiny", data=str(files / "docs.txt"), tokenizer=str(files / "tokenizer"),
                  seq_len=32, batch_size=8, max_steps=30, lr=3e-3, warmup_steps=3, log_every=5, eval_every=10,
                  eval_batches=2, save_every=10)
    return PretrainConfig(**{**kwargs, **overrides})


def tiny_sft(files: Path, out_dir: Path, **overrides) -> SFTConfig:
    kwargs = dict(out_dir=str(out_dir), model=str(files / "base"), data=str(files / "demos.jsonl"), batch_size=16,
                  max_steps=30, lr=3e-3, warmup_steps=3, log_every=5, eval_every=10, save_every=10)
    return SFTConfig(**{**kwargs, **overrides})


# ---------------------------------------------------------------- training and outputs


def test_pretrain_learns_and_writes_a_loadable_model(files, tmp_path):
    # tokenizer=None: trains our BPE on the data, the default path
    final = pretrain(tiny_pretrain(files, tmp_path / "run", tokenizer=None))
    metrics = read_metrics(tmp_path / "run")
    train = [m["train/loss"] for m in metrics if "train/loss" in m]
    assert train[-1] < train[0] - 1.0, train
    assert {"charts/lr", "charts/tokens_per_s"} <= set(metrics[0])
    valid = [m for m in metrics if "valid/loss" in m]
    assert [m["step"] for m in valid] == [10, 20, 30]
    assert valid[-1]["valid/perplexity"] == pytest.approx(torch.tensor(valid[-1]["valid/loss"]).exp().item())

    assert final == tmp_path / "run" / "model" and (final / "model.safetensors").exists()
    model = AutoModelForCausalLM.from_pretrained(final)
    tokenizer = AutoTokenizer.from_pretrained(final)
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id) == (0, 1)
    ids = tokenizer("Anna likes", return_tensors="pt")["input_ids"]
    assert model(ids).logits.shape == (1, ids.shape[1], len(tokenizer))
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["tokens_seen"] == 30 * 8 * 32 and summary["valid_perplexity"] > 1
    assert not (tmp_path / "run" / "checkpoint").exists()  # a finished stage keeps only its model
    assert any((tmp_path / "run" / "tb").iterdir())
    assert pretrain(tiny_pretrain(files, tmp_path / "run", tokenizer=None)) == final  # complete: a no-op


def test_sft_learns_and_writes_a_loadable_model(files, tmp_path):
    final = sft(tiny_sft(files, tmp_path / "sft"))
    metrics = read_metrics(tmp_path / "sft")
    train = [m["train/loss"] for m in metrics if "train/loss" in m]
    assert train[-1] < train[0] - 1.0, train
    assert "valid/loss" in metrics[-1]
    assert (final / "model.safetensors").exists()
    AutoModelForCausalLM.from_pretrained(final)
    assert AutoTokenizer.from_pretrained(final).eos_token == EOS_TOKEN


# ---------------------------------------------------------------- response-only loss


def test_sft_labels_mask_prompt_and_padding_and_train_eos(files):
    tok = AutoTokenizer.from_pretrained(files / "tokenizer")
    ids, labels = encode_pair(tok, "Q: 3 + 4 =", " 7", max_prompt_tokens=64, max_response_tokens=64)
    n_prompt = len(tok("Q: 3 + 4 =", add_special_tokens=False)["input_ids"])
    response = tok(" 7", add_special_tokens=False)["input_ids"]
    assert ids[n_prompt:] == response + [tok.eos_token_id]
    assert labels == [IGNORE] * n_prompt + response + [tok.eos_token_id]  # EOS is a target

    long = encode_pair(tok, "Q: 3 + 4 =", " 7", max_prompt_tokens=64, max_response_tokens=100)
    batch = collate([(ids, labels), encode_pair(tok, "Q: 12 + 34 + 5 + 6 =", " 57", 64, 64), long], tok.pad_token_id)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    assert torch.equal(batch["labels"][0, : len(labels)], torch.tensor(labels))
    pad = batch["attention_mask"] == 0
    assert pad.any() and (batch["labels"][pad] == IGNORE).all() and (batch["input_ids"][pad] == tok.pad_token_id).all()
    # a response cut by max_response_tokens loses its EOS: it did not end there
    _, cut = encode_pair(tok, "Q: 3 + 4 =", " seven plus more words", 64, max_response_tokens=2)
    assert cut[-2:] == tok(" seven plus more words", add_special_tokens=False)["input_ids"][:2]


def test_sft_loss_ignores_prompt_targets(files):
    tok = AutoTokenizer.from_pretrained(files / "tokenizer")
    a = encode_pair(tok, "Anna likes a red ball. Q: 3 + 4 =", " 7", 64, 64)
    b = encode_pair(tok, "Carla likes a red ball. Q: 3 + 4 =", " 7", 64, 64)  # another prompt token, same length
    c = encode_pair(tok, "Anna likes a red ball. Q: 3 + 4 =", " 8", 64, 64)  # another response token
    assert len(a[0]) == len(b[0]) and a[0] != b[0]
    logits = torch.randn(1, len(a[0]), len(tok), requires_grad=True)  # the same predictions for all three
    def loss(ex):
        return sft_loss(logits, collate([ex], tok.pad_token_id)["labels"])
    assert torch.equal(loss(a), loss(b))  # changing a prompt token (a target inside the prompt) changes nothing
    assert not torch.equal(loss(a), loss(c))
    loss(a).backward()
    n_prompt = a[1].count(IGNORE)
    grad = logits.grad[0].abs().sum(-1)  # (L,): position t predicts token t + 1
    assert (grad[: n_prompt - 1] == 0).all()  # predictions of prompt tokens get no gradient
    assert (grad[n_prompt - 1 : -1] > 0).all()  # those of the response tokens and EOS do
    assert grad[-1] == 0  # nothing follows EOS


# ---------------------------------------------------------------- checkpoints and resume


class Crash(Exception):
    pass


@pytest.mark.parametrize("stage", ["pretrain", "sft"])
def test_resume_after_a_crash_gives_the_same_weights(files, tmp_path, monkeypatch, stage):
    make, run = (tiny_pretrain, pretrain) if stage == "pretrain" else (tiny_sft, sft)
    overrides = dict(max_steps=14, save_every=4, log_every=1, eval_every=5)
    straight = run(make(files, tmp_path / "straight", **overrides))

    real_log = RunLogger.log
    def crash_at_step_11(self, step, metrics):  # checkpoint at 8, lines for 9 and 10 already written
        if step == 11:
            raise Crash
        real_log(self, step, metrics)
    with monkeypatch.context() as m:
        m.setattr(RunLogger, "log", crash_at_step_11)
        with pytest.raises(Crash):
            run(make(files, tmp_path / "crashed", **overrides))
    assert json.loads((tmp_path / "crashed" / "checkpoint" / "trainer_state.json").read_text())["step"] == 8
    assert max(m["step"] for m in read_metrics(tmp_path / "crashed")) == 10

    resumed_from = []
    real_load = load_checkpoint
    def spy_load(*args):
        state = real_load(*args)
        resumed_from.append(state["step"])
        return state
    module = agents.pretrain if stage == "pretrain" else agents.sft
    monkeypatch.setattr(module, "load_checkpoint", spy_load)
    resumed = run(make(files, tmp_path / "crashed", **overrides))
    assert resumed_from == [8]  # a real resume, not a restart

    a = AutoModelForCausalLM.from_pretrained(straight).state_dict()
    b = AutoModelForCausalLM.from_pretrained(resumed).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the metrics have no duplicates and no gaps, and equal the uninterrupted run's
    def strip(ms):
        return [{k: v for k, v in m.items() if k != "charts/tokens_per_s"} for m in ms]
    assert strip(read_metrics(tmp_path / "crashed")) == strip(read_metrics(tmp_path / "straight"))


def test_checkpoint_survives_a_crash_between_the_renames(files, tmp_path):
    tok = AutoTokenizer.from_pretrained(files / "tokenizer")

    def make(seed):  # a dict of models, as PPO saves them: an HF model and a plain module
        torch.manual_seed(seed)
        models = {"policy": build_model("tiny", tok, seed=seed), "value": torch.nn.Linear(64, 1)}
        optimizer = torch.optim.AdamW([p for m in models.values() for p in m.parameters()], lr=1e-3)
        return models, optimizer, cosine_schedule(optimizer, 2, 10, 0.1)

    models, optimizer, scheduler = make(0)
    ids = torch.tensor([[2, 3, 4]])
    (models["policy"](ids, labels=ids).loss + models["value"](torch.ones(64)).sum()).backward()
    optimizer.step(), scheduler.step()
    save_checkpoint(tmp_path / "checkpoint", models, optimizer, scheduler, {"step": 1})
    assert (tmp_path / "checkpoint" / "policy" / "model.safetensors").exists()
    save_checkpoint(tmp_path / "checkpoint", models, optimizer, scheduler, {"step": 2})  # replaces the first
    (tmp_path / "checkpoint").rename(tmp_path / "checkpoint.old")  # the state right after a third save's 1st rename

    fresh, fresh_opt, fresh_sched = make(1)
    state = load_checkpoint(tmp_path / "checkpoint", fresh, fresh_opt, fresh_sched)
    assert state == {"step": 2} and fresh_sched.last_epoch == 1
    for name in models:
        assert all(torch.equal(p, q)
                   for p, q in zip(models[name].state_dict().values(), fresh[name].state_dict().values()))
    assert torch.equal(fresh_opt.state_dict()["state"][0]["exp_avg"], optimizer.state_dict()["state"][0]["exp_avg"])
    assert load_checkpoint(tmp_path / "nothing", fresh, fresh_opt, fresh_sched) is None


# ---------------------------------------------------------------- run folders


def test_run_folder_guards(files, tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("precious")
    with pytest.raises(ValueError, match="not a run folder"):
        pretrain(tiny_pretrain(files, foreign))
    assert (foreign / "thesis.tex").read_text() == "precious"

    check_run_dir(tmp_path / "run", {"stage": "pretrain", **agents.pretrain.run_config(tiny_pretrain(files, "x"))})
    with pytest.raises(ValueError, match=r"different configuration \(lr: 0.003 -> 0.001, seed: 0 -> 1\)"):
        pretrain(tiny_pretrain(files, tmp_path / "run", lr=1e-3, seed=1))
    (tmp_path / "run" / "metrics.jsonl").write_text("{}\n")
    check_run_dir(tmp_path / "run", {"stage": "other"}, overwrite=True)  # deletes the old run
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["config.json"]


def test_config_changes_ignore_fields_a_newer_version_added():
    old = {"lr": 0.1, "seed": 0, "ppo": {"iterations": 20, "kl_coef": 0.3}}
    assert config_changes(old, {**old, "new_field": 8, "ppo": {**old["ppo"], "micro_batch_size": 8}}) == []
    assert config_changes(old, {"lr": 0.2, "ppo": {"iterations": 30, "kl_coef": 0.3}}) == [
        "lr: 0.1 -> 0.2", "ppo.iterations: 20 -> 30", "seed: 0 -> (no such field)"]


# ---------------------------------------------------------------- bad input


def test_bad_inputs_are_named(files, tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ValueError, match="empty.jsonl is empty"):
        sft(tiny_sft(files, tmp_path / "a", data=str(tmp_path / "empty.jsonl")))
    (tmp_path / "empty.txt").write_text("\n\n  \n")
    with pytest.raises(ValueError, match="empty.txt is empty"):
        pretrain(tiny_pretrain(files, tmp_path / "b", data=str(tmp_path / "empty.txt")))

    (tmp_path / "bad.jsonl").write_text('{"prompt": "a", "response": "b"}\n{"prompt": "a", "resp\n')
    with pytest.raises(ValueError, match="bad.jsonl, line 2: not valid JSON"):
        read_records(tmp_path / "bad.jsonl")

    write_jsonl(tmp_path / "cols.jsonl", [{"question": "a", "response": "b"}] * 40)
    with pytest.raises(ValueError, match=r"no column 'prompt'; columns present: \['question', 'response'\]"):
        sft(tiny_sft(files, tmp_path / "c", data=str(tmp_path / "cols.jsonl")))
    write_jsonl(tmp_path / "docs.jsonl", [{"body": "hello"}])
    with pytest.raises(ValueError, match=r"no column 'text'; columns present: \['body'\]"):
        pretrain(tiny_pretrain(files, tmp_path / "d", data=str(tmp_path / "docs.jsonl")))

    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        PretrainConfig(preset="huge")
    with pytest.raises(ValueError, match="unknown task 'poetry'"):
        SFTConfig(task="poetry")

    tok = AutoTokenizer.from_pretrained(files / "tokenizer")
    same = PreTrainedTokenizerFast(tokenizer_object=tok.backend_tokenizer, pad_token=EOS_TOKEN, eos_token=EOS_TOKEN)
    same.save_pretrained(tmp_path / "pad_is_eos")
    with pytest.raises(ValueError, match="same id 1 for PAD and EOS"):
        pretrain(tiny_pretrain(files, tmp_path / "e", tokenizer=str(tmp_path / "pad_is_eos")))


@pytest.mark.parametrize("cuda, cuda_bf16, amx, expected", [
    (False, False, False, False),  # a CPU without AMX (AVX512-BF16 alone): bf16 is slower than fp32
    (False, False, True, True),    # a CPU with AMX tiles
    (True, True, False, True),     # a GPU with bf16
    (True, False, True, False),    # a GPU without bf16: the GPU decides, not the host CPU
])
def test_bf16_defaults_to_where_it_is_faster(monkeypatch, cuda, cuda_bf16, amx, expected):
    from agents.reward_model import RMConfig

    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: cuda_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    assert PretrainConfig().bf16 is expected
    assert SFTConfig(model="m").bf16 is expected
    assert RMConfig(data="d", model="m").bf16 is expected
    assert PretrainConfig(bf16=not expected).bf16 is not expected  # an explicit choice wins
