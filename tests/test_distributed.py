"""Data-parallel training on CPU: SFT, the reward model, pretraining, DPO, PPO, GRPO and RLOO launched as 2 processes
(gloo) with `accelerate launch --config_file configs/accelerate/ddp.yaml` (which starts them through
torch.distributed.run, as torchrun does), against the same runs in one process.

The 2-process runs are one real launch (a subprocess, on a free port) of tests/distributed_worker.py, which runs the
trainers unchanged, one after the other, and has each process write a sha256 of the parameters and optimizer state
it ended each run with. Checked:
  - both processes end with bitwise identical parameters and optimizer states, and those parameters are the ones
    the main process saved;
  - the final weights equal a 1-process run's with the same global batch and seed within ATOL;
  - only the main process printed and logged: one header line, the same metrics lines as the 1-process run;
  - a checkpoint written by 2 processes resumes in 1 and one written by 1 resumes in 2, ending where a straight
    1-process run ends (SFT, DPO, PPO);
  - the RL runs sample the 1-process episodes (samples.jsonl holds the same texts).
The launch takes ~20 s on 2 cores, ~10 s of it two interpreters importing torch/transformers (hence one launch for
all the runs); the runs are a few steps of the `tiny` preset. The 1-process runs happen in this process.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

import agents.dpo
import agents.ppo
import agents.sft
from agents.distributed import rollout_uniforms
from agents.dpo import DPOConfig, dpo
from agents.grpo import GRPOConfig, grpo
from agents.lora import LoRAConfig
from agents.ppo import PPOConfig, ppo
from agents.pretrain import PretrainConfig, pretrain
from agents.reward_model import RMConfig, score_texts, train_reward_model
from agents.rloo import RLOOConfig, rloo
from agents.sampler import rollout
from agents.sft import SFTConfig, sft
from tests.distributed_worker import params_sha256
from textenv import TextGenVectorEnv
from textenv.models import build_model
from textenv.tokenizer import train_tokenizer

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "distributed_worker.py"
DDP_CPU = ROOT / "configs" / "accelerate" / "ddp.yaml"

# 2 processes vs 1 differ only in float rounding: each process runs its half of the batch (padded to its own longest
# row), DDP sums the two half-gradients in another order, and the token count of the loss is an all-reduce. Measured
# on these runs (6 AdamW steps, lr 3e-3): max |w_2 - w_1| <= 6e-7 (`max_abs_diff`). 1e-5 leaves 15x headroom and is
# ~300x smaller than one AdamW step (up to ~lr per weight): a skipped or doubled step, a missing shard, or a loss
# averaged per process instead of over the global batch's tokens (1e-2 here; see agents/sft.py) lands far above it.
# With CUDA visible, the in-process 1-process references train on the GPU (the trainers' default) while the launched
# processes stay on the CPU: seen on an H200, SFT's weights then differ by 3.4e-5 after the 6 steps. 1e-4 is still
# 30x below one AdamW step.
ATOL = 1e-4 if torch.cuda.is_available() else 1e-5
# The reward model is compared by its scores instead: its saved weights carry the normalisation shift in ln_f.bias
# divided by ||w_score||^2, which multiplies a 1e-6 difference of the reference mean by ~50. A rounding-only change in
# one process (every batch padded 5 columns wider) moves these scores by 4e-5; the 2-process run, by 1e-5.
RM_SCORE_ATOL = 1e-4
# PPO, GRPO and RLOO: process r samples global rows [8r, 8r + 8) with those rows' prompts and U[0, 1) numbers, so the
# episodes are the 1-process ones (checked: the same texts in samples.jsonl); what differs is rounding (the rollout's
# and the update's forwards over 8 rows instead of 16, the gradients' sum over the processes). Measured on these runs
# (4 iterations x 4 Adam steps, lr 1e-3): max |w_2 - w_1| <= 2.4e-7 for policies and value models. ATOL applies; one
# sampled token changed by the rounding would show as different samples first. A loss normalised by each process's
# token count instead of the global minibatch's changes the iteration-2 samples (tested by hand).


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The launched processes run with OMP_NUM_THREADS=1; so does the in-process 1-process reference run."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Plain text, demonstrations whose responses have 1 to 9 tokens (so the two halves of a batch hold different
    numbers of response tokens), ranked comparisons with 2 or 3 responses, and a tiny GPT-2 with its tokenizer."""
    root = tmp_path_factory.mktemp("data")
    rng = random.Random(0)
    words = ["red", "old", "small", "green", "blue", "warm", "slow", "long", "good", "bad"]
    docs = [" ".join(f"the {rng.choice(words)} {rng.choice(['cat', 'boat', 'door', 'kite'])}." for _ in range(8))
            for _ in range(60)]
    (root / "docs.txt").write_text("\n\n".join(docs))
    demos = [{"prompt": f"Q: count {n} =", "response": " " + " ".join(words[:n])}
             for n in rng.choices(range(1, 10), k=80)]
    (root / "demos.jsonl").write_text("".join(json.dumps(d) + "\n" for d in demos))
    prefs = []
    for i in range(40):  # the labeller prefers "good" to "so so" to "bad"; K = 2 or 3 responses
        row = {"prompt": f"the film {i} was", "responses": [" good and fun.", " bad and slow."], "ranking": [0, 1],
               "gold": [1.0, -1.0]}
        if i % 2:
            row = {**row, "responses": row["responses"] + [" so so."], "ranking": [0, 2, 1], "gold": [1.0, -1.0, 0.0]}
        prefs.append(row)
    (root / "prefs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in prefs))
    tokenizer = train_tokenizer(docs + [d["prompt"] + d["response"] for d in demos] + ["the film was good so bad fun"],
                                vocab_size=512)
    tokenizer.save_pretrained(root / "tokenizer")
    build_model("tiny", tokenizer, seed=0).save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    # The RL policy: the base model with the final layer norm's output pushed towards EOS's embedding, so that
    # responses end anywhere from 1 to 6 tokens (or are cut at 6): the processes' shares of a minibatch then hold
    # different numbers of tokens, which a loss normalised per process instead of globally gets wrong.
    policy = build_model("tiny", tokenizer, seed=0)
    with torch.no_grad():
        policy.transformer.ln_f.bias += 100 * policy.transformer.wte.weight[tokenizer.eos_token_id]
    policy.save_pretrained(root / "policy")
    tokenizer.save_pretrained(root / "policy")
    return root


def sft_config(files: Path, out_dir: Path, **kw) -> SFTConfig:
    return SFTConfig(out_dir=str(out_dir), model=str(files / "base"), data=str(files / "demos.jsonl"), batch_size=8,
                     max_steps=6, lr=3e-3, warmup_steps=2, log_every=1, eval_every=3, save_every=3, bf16=False, **kw)


def rm_config(files: Path, out_dir: Path) -> RMConfig:
    # 36 train prompts / batch 8: 4 steps; 4 held-out prompts (2 per process)
    # lr 1e-3 (the default): at 3e-3 the 4th step overshoots and amplifies rounding differences 30x
    return RMConfig(out_dir=str(out_dir), data=str(files / "prefs.jsonl"), model=str(files / "base"), task=None,
                    batch_size=8, lr=1e-3, warmup_steps=1, log_every=1, eval_every=2, save_every=2,
                    bf16=False)


def pretrain_config(files: Path, out_dir: Path, **kw) -> PretrainConfig:
    return PretrainConfig(out_dir=str(out_dir), preset="tiny", data=str(files / "docs.txt"),
                          tokenizer=str(files / "tokenizer"), seq_len=32, batch_size=8, max_steps=6, lr=3e-3,
                          warmup_steps=2, log_every=1, eval_every=3, eval_batches=1, save_every=3, bf16=False, **kw)


def dpo_config(files: Path, out_dir: Path, **kw) -> DPOConfig:
    # 40 best-vs-worst pairs, batch 8 (4 per process), 4 steps; lr 1e-3 so that the steps move the weights visibly
    return DPOConfig(out_dir=str(out_dir), policy=str(files / "base"), comparisons=str(files / "prefs.jsonl"),
                     batch_size=8, max_steps=4, lr=1e-3, warmup_steps=1, log_every=1, save_every=2, **kw)


# scores: the response's length in characters, or -1 (missing_eos_penalty) for a response cut at 6 tokens
RL_COMMON = dict(reward="tests.conftest:length_reward", task="sentiment", max_new_tokens=6,
                 sample_every=2, save_every=2, iterations=4, lr=1e-3)


def ppo_config(files: Path, out_dir: Path, **kw) -> PPOConfig:
    # 16 episodes (8 per process), minibatches of 8 rows (4 per process) in micro-batches of 3: 3 + 3 + 2 rows in one
    # process, 3 + 1 in each of two
    return PPOConfig(out_dir=str(out_dir), policy=str(files / "policy"), num_envs=16, num_minibatches=2,
                     update_epochs=2, micro_batch_size=3, **{**RL_COMMON, **kw})


def ppo_ptx_config(files: Path, out_dir: Path) -> PPOConfig:
    """The shared value head and PPO-ptx (each process takes its share of the minibatch's pretraining blocks)."""
    return ppo_config(files, out_dir, shared_value_head=True, ptx_coef=0.5, ptx_data=str(files / "docs.txt"),
                      ptx_seq_len=16, iterations=2)


def grpo_config(files: Path, out_dir: Path, **kw) -> GRPOConfig:
    return GRPOConfig(out_dir=str(out_dir), policy=str(files / "policy"), num_prompts=4, num_generations=2,
                      num_minibatches=2, update_epochs=2, beta=0.04, **RL_COMMON, **kw)


def rloo_config(files: Path, out_dir: Path, **kw) -> RLOOConfig:
    return RLOOConfig(out_dir=str(out_dir), policy=str(files / "policy"), num_prompts=4, num_generations=2,
                      num_minibatches=2, update_epochs=2, kl_coef=0.3, **RL_COMMON, **kw)


class Stop(Exception):
    pass


@pytest.fixture(scope="module")
def sft_one(files, tmp_path_factory) -> Path:
    """The 1-process reference SFT run (in this process)."""
    return sft(sft_config(files, tmp_path_factory.mktemp("sft_one") / "run"))


@pytest.fixture(scope="module")
def ppo_one(files, tmp_path_factory) -> Path:
    """The 1-process reference PPO run (in this process)."""
    return ppo(ppo_config(files, tmp_path_factory.mktemp("ppo_one") / "run"))


@pytest.fixture(scope="module")
def launched(files, tmp_path_factory):
    """One `accelerate launch --config_file ddp.yaml` (2 processes, gloo, 1 thread each) running these jobs:
    sft_two (straight), sft_two_to_one (stopped after its step-3 checkpoint), sft_one_to_two (resuming the step-3
    checkpoint of a 1-process run stopped here first), rm_two, pretrain_two, dpo_two, dpo_two_to_one (stopped after
    its step-2 checkpoint), ppo_two, ppo_two_to_one (stopped after iteration 2), ppo_one_to_two (resuming a 1-process
    run stopped here after iteration 2), ppo_ptx_two, grpo_two and rloo_two. Returns (root, completed process)."""
    root = tmp_path_factory.mktemp("launch")
    for module, run, cfg in ((agents.sft, sft, sft_config(files, root / "sft_one_to_two")),
                             (agents.ppo, ppo, ppo_config(files, root / "ppo_one_to_two")),
                             (agents.ppo, ppo, ppo_config(files, root / "ppo_fsdp_one_to_two", parallel="fsdp"))):
        real_save = module.save_checkpoint

        def save_then_stop(*args, real_save=real_save):
            real_save(*args)
            raise Stop

        with pytest.MonkeyPatch.context() as m, pytest.raises(Stop):
            m.setattr(module, "save_checkpoint", save_then_stop)
            run(cfg)  # 1 process, stopped right after its first checkpoint
    jobs = [("sft", sft_config(files, root / "sft_two"), False),
            ("sft", sft_config(files, root / "sft_two_to_one"), True),
            ("sft", sft_config(files, root / "sft_one_to_two"), False),
            ("sft", sft_config(files, root / "sft_fsdp_two", parallel="fsdp"), False),
            ("rm", rm_config(files, root / "rm_two"), False),
            ("pretrain", pretrain_config(files, root / "pretrain_two"), False),
            ("pretrain", pretrain_config(files, root / "pretrain_fsdp_two", parallel="fsdp"), False),
            ("dpo", dpo_config(files, root / "dpo_two"), False),
            ("dpo", dpo_config(files, root / "dpo_two_to_one"), True),
            ("dpo", dpo_config(files, root / "dpo_fsdp_two", parallel="fsdp"), False),
            ("ppo", ppo_config(files, root / "ppo_two"), False),
            ("ppo", ppo_config(files, root / "ppo_two_to_one"), True),
            ("ppo", ppo_config(files, root / "ppo_one_to_two"), False),
            ("ppo", ppo_config(files, root / "ppo_fsdp_two", parallel="fsdp", shard_reference=True), False),
            ("ppo", ppo_config(files, root / "ppo_fsdp_two_to_one", parallel="fsdp"), True),
            ("ppo", ppo_config(files, root / "ppo_fsdp_one_to_two", parallel="fsdp"), False),
            ("ppo", ppo_ptx_config(files, root / "ppo_ptx_two"), False),
            ("sft", sft_config(files, root / "sft_lora_two", lora=LoRAConfig(rank=4)), False),
            ("ppo", ppo_config(files, root / "ppo_lora_two", lora=LoRAConfig(rank=4)), False),
            ("grpo", grpo_config(files, root / "grpo_two"), False),
            ("rloo", rloo_config(files, root / "rloo_two"), False),
            ("grpo", grpo_config(files, root / "grpo_fsdp_two", parallel="fsdp", shard_reference=True), False),
            ("rloo", rloo_config(files, root / "rloo_fsdp_two", parallel="fsdp"), False)]
    jobs = [{"stage": stage, "config": dataclasses.asdict(cfg), "stop_after_save": stop,
             "report_dir": str(root / "reports" / Path(cfg.out_dir).name)} for stage, cfg, stop in jobs]
    (root / "jobs.json").write_text(json.dumps(jobs))
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(DDP_CPU), str(WORKER),
           str(root / "jobs.json")]
    launcher_vars = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")  # were pytest itself launched
    env = {k: v for k, v in os.environ.items() if k not in launcher_vars}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return root, proc


def reports(root: Path, run: str) -> list[dict]:
    """Both processes' reports; they ran as one group of 2 and ended with identical parameters and optimizer states."""
    out = [json.loads((root / "reports" / run / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["world_size"] for r in out] == [2, 2]
    assert out[0]["params"] == out[1]["params"] and out[0]["optimizer"] == out[1]["optimizer"]
    return out


def assert_halves(reports: list[dict], whole: int) -> None:
    """Each of the 2 processes held about half of the `whole` model's weights (its shards), together all of them (a
    weight whose first dimension is odd, as a (1, E) value head, puts its extra row on one process)."""
    held = [r["numel_held"] for r in reports]
    assert sum(held) == whole and max(held) < 0.55 * whole, held


def check_final(root: Path, run: str, load, resumed_step=None) -> None:
    """The run finished; the model the main process saved is the one both processes hold; no leftovers."""
    rep = reports(root, run)
    assert [r["resumed_step"] for r in rep] == [resumed_step] * 2 and not rep[0]["stopped"]
    assert rep[0]["params"] == params_sha256(load(root / run / "model"))
    assert (root / run / "summary.json").exists()
    assert not (root / run / "checkpoint").exists() and not (root / run / "model.tmp").exists()


def max_abs_diff(a: torch.nn.Module, b: torch.nn.Module) -> float:
    """max |a - b| over the weights of two GPT-2s, leaving out the key part of each attention's c_attn bias: adding
    one vector to all keys adds one number to each query's logits, which softmax ignores, so that bias has a true
    gradient of 0; AdamW divides the rounding noise it gets instead by that noise's own running RMS and moves it by
    ~5e-6 here, in a direction that changes no output."""
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    diff = {k: (sa[k] - sb[k]).abs() for k in sa}
    for k in diff:
        if k.endswith("attn.c_attn.bias"):  # [query | key | value] biases, n_embd each
            n_embd = diff[k].shape[0] // 3
            diff[k] = torch.cat([diff[k][:n_embd], diff[k][2 * n_embd :]])
    return max(d.max().item() for d in diff.values())


def read_metrics(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def assert_same_metrics(a: list[dict], b: list[dict]) -> None:
    """The same lines (steps and names, each once) with the same values up to float rounding; throughput and
    timings aside."""
    def strip(ms):
        return [{k: v for k, v in m.items() if not (k.endswith("tokens_per_s") or k.startswith("time/"))}
                            for m in ms]
    a, b = strip(a), strip(b)
    assert [sorted(m) for m in a] == [sorted(m) for m in b] and [m["step"] for m in a] == [m["step"] for m in b]
    for x, y in zip(a, b):
        # a clip fraction counts tokens (or sequences) past a threshold, and one ratio within float rounding of
        # the clip boundary flips it by a whole token's or sequence's share; so it is only checked to be a
        # fraction. Every other metric is a continuous function of the weights and is compared up to rounding:
        # a log-prob near -8 carries about 1e-6 of it (one float32 ulp of logsumexp), a KL sums ~50 of them with
        # cancellation (4.5e-6 seen), and a loss is a mean of terms of both signs (relative 1.4e-5 seen)
        discrete = {k for k in x if k.endswith("clipfrac")}
        assert {k: v for k, v in x.items() if k not in discrete} == pytest.approx(
            {k: v for k, v in y.items() if k not in discrete}, rel=1e-4, abs=2e-5)
        assert all(0.0 <= x[k] <= 1.0 for k in discrete)


def test_only_the_main_process_prints(launched):
    _, proc = launched
    # one header line per run: five SFT runs, one RM run, two pretraining runs
    assert proc.stdout.count("demonstrations, 6 steps") == 5
    assert proc.stdout.count("held-out prompts") == 1 and proc.stdout.count("pretrain: ") == 2
    assert proc.stdout.count("pairs (best_vs_worst)") == 3  # dpo_two, dpo_two_to_one and dpo_fsdp_two


# ---------------------------------------------------------------- SFT


def test_sft_two_processes_train_the_one_process_model(launched, sft_one):
    root, _ = launched
    check_final(root, "sft_two", AutoModelForCausalLM.from_pretrained)
    assert max_abs_diff(AutoModelForCausalLM.from_pretrained(root / "sft_two" / "model"),
                        AutoModelForCausalLM.from_pretrained(sft_one)) < ATOL
    assert_same_metrics(read_metrics(root / "sft_two"), read_metrics(sft_one.parent))
    valid = [json.loads((d / "summary.json").read_text())["valid_loss"] for d in (root / "sft_two", sft_one.parent)]
    assert valid[0] == pytest.approx(valid[1], rel=1e-5)


def test_sft_sharded_over_two_processes_trains_the_one_process_model(launched, sft_one):
    """--parallel fsdp: each process held half of every weight and optimizer state; the gathered model/ is a plain
    transformers folder with the 1-process run's weights, and the same metrics were logged."""
    root, _ = launched
    check_final(root, "sft_fsdp_two", AutoModelForCausalLM.from_pretrained)
    whole = AutoModelForCausalLM.from_pretrained(root / "sft_fsdp_two" / "model").num_parameters()
    assert_halves(reports(root, "sft_fsdp_two"), whole)
    assert [r["numel_held"] for r in reports(root, "sft_two")] == [whole] * 2  # DDP: a whole replica each
    assert max_abs_diff(AutoModelForCausalLM.from_pretrained(root / "sft_fsdp_two" / "model"),
                        AutoModelForCausalLM.from_pretrained(sft_one)) < ATOL
    assert_same_metrics(read_metrics(root / "sft_fsdp_two"), read_metrics(sft_one.parent))


def run_name(stage: str, parallel: str, suffix: str) -> str:
    """A launched job's folder: e.g. ppo_two_to_one (replicated) or ppo_fsdp_two_to_one (sharded)."""
    return f"{stage}_{suffix}" if parallel == "ddp" else f"{stage}_fsdp_{suffix}"


def test_sft_checkpoint_of_two_processes_resumes_in_one(launched, files, sft_one, monkeypatch):
    """Replicated (the sharded checkpoint's two directions are PPO's tests below: the same code, more models)."""
    root, _ = launched
    run, ckpt = root / "sft_two_to_one", root / "sft_two_to_one" / "checkpoint"
    assert reports(root, "sft_two_to_one")[0]["stopped"]
    assert json.loads((ckpt / "trainer_state.json").read_text())["step"] == 3
    assert not (run / "model").exists() and not (run / "summary.json").exists()
    assert (ckpt / "optimizer.pt").exists() and not (ckpt / "dcp").exists()
    resumed_from = spy_resume(monkeypatch, agents.sft, "step")
    final = sft(sft_config(files, run))  # 1 process
    assert resumed_from == [3]  # a real resume, not a restart
    assert max_abs_diff(AutoModelForCausalLM.from_pretrained(final),
                        AutoModelForCausalLM.from_pretrained(sft_one)) < ATOL
    assert_same_metrics(read_metrics(run), read_metrics(sft_one.parent))


def test_sft_checkpoint_of_one_process_resumes_in_two(launched, sft_one):
    root, _ = launched
    name = "sft_one_to_two"
    check_final(root, name, AutoModelForCausalLM.from_pretrained, resumed_step=3)
    assert max_abs_diff(AutoModelForCausalLM.from_pretrained(root / name / "model"),
                        AutoModelForCausalLM.from_pretrained(sft_one)) < ATOL
    assert_same_metrics(read_metrics(root / name), read_metrics(sft_one.parent))


# ---------------------------------------------------------------- LoRA

def adapter_diff(a: Path, b: Path) -> float:
    """Largest difference between two runs' saved PEFT adapters (the same tensors by name)."""
    x, y = (load_file(run / "model" / "adapter_model.safetensors") for run in (a, b))
    assert x.keys() == y.keys() and x
    return max((x[k] - y[k]).abs().max().item() for k in x)


@pytest.mark.parametrize("stage", ["sft", "ppo"])
def test_lora_two_processes_train_the_one_process_adapter(launched, files, tmp_path, stage):
    """DDP over a PEFT model: the processes end with one adapter, the 1-process run's, and the same metrics (PPO:
    the reference is the base with the adapter off in each process)."""
    root, _ = launched
    name = f"{stage}_lora_two"
    rep = reports(root, name)
    assert rep[0]["params"] == rep[1]["params"] and not rep[0]["stopped"]
    config = {"sft": sft_config, "ppo": ppo_config}[stage](files, tmp_path / "one", lora=LoRAConfig(rank=4))
    one = (sft if stage == "sft" else ppo)(config).parent
    assert adapter_diff(root / name, one) < ATOL
    assert_same_metrics(read_metrics(root / name), read_metrics(one))


# ---------------------------------------------------------------- reward model and pretraining


def test_reward_model_two_processes_train_the_one_process_model(launched, files, tmp_path):
    root, _ = launched
    load = AutoModelForSequenceClassification.from_pretrained
    check_final(root, "rm_two", load)
    one = train_reward_model(rm_config(files, tmp_path / "one"))
    rows = [json.loads(line) for line in (files / "prefs.jsonl").read_text().splitlines()]
    prompts, responses = [r["prompt"] for r in rows for _ in r["responses"]], [x for r in rows for x in r["responses"]]
    tokenizer = AutoTokenizer.from_pretrained(one)
    # the saved models' scores: normalised, since the shift is folded into the weights
    two_scores, one_scores = (score_texts(load(folder), tokenizer, prompts, responses)
                              for folder in (root / "rm_two" / "model", one))
    assert one_scores.std() > 0.1 and (two_scores - one_scores).abs().max() < RM_SCORE_ATOL
    assert_same_metrics(read_metrics(root / "rm_two"), read_metrics(tmp_path / "one"))
    s2, s1 = (json.loads((d / "summary.json").read_text()) for d in (root / "rm_two", tmp_path / "one"))
    assert s2["heldout_pairs"] == s1["heldout_pairs"] and s2["annotator_ceiling"] == s1["annotator_ceiling"] == 1.0
    assert s2["normalization"] == pytest.approx(s1["normalization"], abs=RM_SCORE_ATOL)


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_pretrain_two_processes_train_the_one_process_model(launched, files, tmp_path, parallel):
    root, _ = launched
    name = "pretrain_two" if parallel == "ddp" else "pretrain_fsdp_two"
    check_final(root, name, AutoModelForCausalLM.from_pretrained)
    if parallel == "fsdp":
        assert_halves(reports(root, name), AutoModelForCausalLM.from_pretrained(root / name / "model").num_parameters())
    one = pretrain(pretrain_config(files, tmp_path / "one"))
    assert max_abs_diff(AutoModelForCausalLM.from_pretrained(root / name / "model"),
                        AutoModelForCausalLM.from_pretrained(one)) < ATOL
    assert_same_metrics(read_metrics(root / name), read_metrics(tmp_path / "one"))


# ---------------------------------------------------------------- DPO


@pytest.fixture(scope="module")
def dpo_one(files, tmp_path_factory) -> Path:
    """The 1-process reference DPO run (in this process)."""
    return dpo(dpo_config(files, tmp_path_factory.mktemp("dpo_one") / "run"))


def test_dpo_two_processes_train_the_one_process_model(launched, dpo_one):
    root, _ = launched
    check_final(root, "dpo_two", AutoModelForCausalLM.from_pretrained)
    assert max_abs_diff(AutoModelForCausalLM.from_pretrained(root / "dpo_two" / "model"),
                        AutoModelForCausalLM.from_pretrained(dpo_one)) < ATOL
    assert_same_metrics(read_metrics(root / "dpo_two"), read_metrics(dpo_one.parent))


def test_dpo_sharded_over_two_processes_trains_the_one_process_model(launched, dpo_one):
    root, _ = launched
    check_final(root, "dpo_fsdp_two", AutoModelForCausalLM.from_pretrained)
    whole = AutoModelForCausalLM.from_pretrained(root / "dpo_fsdp_two" / "model").num_parameters()
    assert_halves(reports(root, "dpo_fsdp_two"), whole)
    assert max_abs_diff(AutoModelForCausalLM.from_pretrained(root / "dpo_fsdp_two" / "model"),
                        AutoModelForCausalLM.from_pretrained(dpo_one)) < ATOL
    assert_same_metrics(read_metrics(root / "dpo_fsdp_two"), read_metrics(dpo_one.parent))


def test_dpo_checkpoint_of_two_processes_resumes_in_one(launched, files, dpo_one, monkeypatch):
    root, _ = launched
    run = root / "dpo_two_to_one"
    assert reports(root, "dpo_two_to_one")[0]["stopped"]
    assert json.loads((run / "checkpoint" / "trainer_state.json").read_text())["step"] == 2
    resumed_from = spy_resume(monkeypatch, agents.dpo, "step")
    final = dpo(dpo_config(files, run))  # 1 process
    assert resumed_from == [2]
    assert max_abs_diff(AutoModelForCausalLM.from_pretrained(final),
                        AutoModelForCausalLM.from_pretrained(dpo_one)) < ATOL
    assert_same_metrics(read_metrics(run), read_metrics(dpo_one.parent))


def spy_resume(monkeypatch, module, step_key: str) -> list:
    """Record the step each `module.load_checkpoint` call resumes from (a real resume, not a restart)."""
    resumed_from = []
    real_load = module.load_checkpoint

    def spy_load(*args):
        state = real_load(*args)
        resumed_from.append(state[step_key])
        return state

    monkeypatch.setattr(module, "load_checkpoint", spy_load)
    return resumed_from


# ---------------------------------------------------------------- PPO, GRPO, RLOO


def test_each_process_plays_its_rows_of_the_one_process_rollout(tiny_model, env_kwargs):
    """The RL trainers' split of a rollout, in this process: pre-drawn uniforms give what the generator gives, and
    two halves of the envs, each with its rows' uniforms and seeds, play the whole batch's episodes."""
    B, T = 8, env_kwargs["max_new_tokens"]
    whole = rollout(tiny_model, TextGenVectorEnv(num_envs=B, **env_kwargs), torch.Generator().manual_seed(3),
                    temperature=1.5, seed=10)  # hot: responses of several lengths
    uniforms = rollout_uniforms(torch.Generator().manual_seed(3), B, T)  # (B, T)
    same = rollout(tiny_model, TextGenVectorEnv(num_envs=B, **env_kwargs), uniforms=uniforms, temperature=1.5, seed=10)
    halves = [rollout(tiny_model, TextGenVectorEnv(num_envs=B // 2, **env_kwargs), uniforms=uniforms[r * 4 : r * 4 + 4],
                      temperature=1.5, seed=10 + r * 4) for r in (0, 1)]
    assert len(set(whole.response_mask.sum(1).tolist())) > 1
    for parts in ([same], halves):
        rows = lambda field, parts=parts: torch.cat([getattr(part, field) for part in parts])  # noqa: E731
        for field in ("prompt_ids", "prompt_mask", "response_ids", "response_mask", "scores", "terminated"):
            assert torch.equal(rows(field), getattr(whole, field)), field
        torch.testing.assert_close(rows("logprobs"), whole.logprobs, atol=1e-6, rtol=0)  # a smaller batch's rounding
    assert halves[0].responses + halves[1].responses == whole.responses
    with pytest.raises(ValueError, match="not both"):
        rollout(tiny_model, TextGenVectorEnv(num_envs=B, **env_kwargs), torch.Generator(), uniforms=uniforms)
    with pytest.raises(ValueError, match=r"uniforms must have shape \(num_envs, max_new_tokens\) = \(4, 6\)"):
        rollout(tiny_model, TextGenVectorEnv(num_envs=4, **env_kwargs), uniforms=uniforms)


def check_final_rl(root: Path, run: str, resumed_step=None) -> None:
    """The RL run finished; the policy the main process saved is the one both processes hold."""
    rep = reports(root, run)
    assert [r["resumed_step"] for r in rep] == [resumed_step] * 2 and not rep[0]["stopped"]
    assert rep[0]["params"]["policy"] == params_sha256(AutoModelForCausalLM.from_pretrained(root / run / "model"))
    assert (root / run / "summary.json").exists()


def assert_same_samples(a: Path, b: Path) -> None:
    """The same episodes: the same prompts and sampled responses (hence the same scores), written once."""
    ra, rb = ([json.loads(line) for line in (d / "samples.jsonl").read_text().splitlines()] for d in (a, b))
    assert len(ra) == len(rb) > 0
    for x, y in zip(ra, rb):
        assert ((x["iteration"], x["prompt"], x["response"], x["score"])
                == (y["iteration"], y["prompt"], y["response"], y["score"]))
        assert x["gold"] == pytest.approx(y["gold"], abs=1e-6)


def rl_diff(a: Path, b: Path) -> float:
    """max_abs_diff of two runs' final policies."""
    return max_abs_diff(AutoModelForCausalLM.from_pretrained(a / "model"),
                        AutoModelForCausalLM.from_pretrained(b / "model"))


def value_diff(a: Path, b: Path) -> float:
    """max_abs_diff of two PPO runs' final value models."""
    load = AutoModelForSequenceClassification.from_pretrained
    return max_abs_diff(load(a / "value_model"), load(b / "value_model"))


def test_ppo_two_processes_train_the_one_process_model(launched, ppo_one):
    root, _ = launched
    check_final_rl(root, "ppo_two")
    assert_same_samples(root / "ppo_two", ppo_one.parent)
    assert rl_diff(root / "ppo_two", ppo_one.parent) < ATOL
    assert value_diff(root / "ppo_two", ppo_one.parent) < ATOL
    assert_same_metrics(read_metrics(root / "ppo_two"), read_metrics(ppo_one.parent))


def test_ppo_sharded_over_two_processes_trains_the_one_process_models(launched, ppo_one):
    """--parallel fsdp: policy and value model sharded (each process holds half of each; here the reference too,
    --shard-reference), sampling from a replica synced from the shards: the 1-process episodes, weights and
    metrics; the gathered folders load with plain transformers."""
    root, _ = launched
    check_final_rl(root, "ppo_fsdp_two")
    whole = sum(load(root / "ppo_fsdp_two" / name).num_parameters() for name, load in
                (("model", AutoModelForCausalLM.from_pretrained),
                 ("value_model", AutoModelForSequenceClassification.from_pretrained)))
    assert_halves(reports(root, "ppo_fsdp_two"), whole)
    assert_same_samples(root / "ppo_fsdp_two", ppo_one.parent)
    assert rl_diff(root / "ppo_fsdp_two", ppo_one.parent) < ATOL
    assert value_diff(root / "ppo_fsdp_two", ppo_one.parent) < ATOL
    assert_same_metrics(read_metrics(root / "ppo_fsdp_two"), read_metrics(ppo_one.parent))


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_ppo_checkpoint_of_two_processes_resumes_in_one(launched, files, ppo_one, monkeypatch, parallel):
    root, _ = launched
    name = run_name("ppo", parallel, "two_to_one")
    run = root / name
    assert reports(root, name)[0]["stopped"]
    assert json.loads((run / "checkpoint" / "trainer_state.json").read_text())["iteration"] == 2
    assert not (run / "model").exists() and not (run / "summary.json").exists()
    assert (run / "checkpoint" / "dcp" / ".metadata").exists() == (parallel == "fsdp")
    resumed_from = spy_resume(monkeypatch, agents.ppo, "iteration")
    ppo(ppo_config(files, run, parallel=parallel))  # 1 process
    assert resumed_from == [2]
    assert rl_diff(run, ppo_one.parent) < ATOL and value_diff(run, ppo_one.parent) < ATOL
    assert_same_samples(run, ppo_one.parent)
    assert_same_metrics(read_metrics(run), read_metrics(ppo_one.parent))


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_ppo_checkpoint_of_one_process_resumes_in_two(launched, ppo_one, parallel):
    root, _ = launched
    name = run_name("ppo", parallel, "one_to_two")
    check_final_rl(root, name, resumed_step=2)
    assert rl_diff(root / name, ppo_one.parent) < ATOL
    assert value_diff(root / name, ppo_one.parent) < ATOL
    assert_same_samples(root / name, ppo_one.parent)
    assert_same_metrics(read_metrics(root / name), read_metrics(ppo_one.parent))


def test_ppo_shared_value_head_and_ptx_two_processes(launched, files, tmp_path):
    root, _ = launched
    check_final_rl(root, "ppo_ptx_two")
    one = ppo(ppo_ptx_config(files, tmp_path / "one")).parent
    assert rl_diff(root / "ppo_ptx_two", one) < ATOL
    head_two, head_one = (load_file(d / "value_model" / "model.safetensors") for d in (root / "ppo_ptx_two", one))
    assert max((head_two[k] - head_one[k]).abs().max().item() for k in head_one) < ATOL
    assert_same_samples(root / "ppo_ptx_two", one)
    assert_same_metrics(read_metrics(root / "ppo_ptx_two"), read_metrics(one))


@pytest.fixture(scope="module", params=["grpo", "rloo"])
def groups_one(request, files, tmp_path_factory) -> tuple[str, Path]:
    """The 1-process reference GRPO and RLOO runs (in this process)."""
    run, config = {"grpo": (grpo, grpo_config), "rloo": (rloo, rloo_config)}[request.param]
    return request.param, run(config(files, tmp_path_factory.mktemp(request.param) / "run")).parent


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_grpo_and_rloo_two_processes_train_the_one_process_model(launched, groups_one, parallel):
    """Replicated (DDP-style, gradients summed) and sharded (FSDP2, sampling from a synced replica): the 1-process
    episodes, weights and metrics."""
    root, _ = launched
    algo, one = groups_one
    name = f"{algo}_two" if parallel == "ddp" else f"{algo}_fsdp_two"
    check_final_rl(root, name)
    if parallel == "fsdp":
        assert_halves(reports(root, name), AutoModelForCausalLM.from_pretrained(root / name / "model").num_parameters())
    assert rl_diff(root / name, one) < ATOL
    assert_same_samples(root / name, one)
    assert_same_metrics(read_metrics(root / name), read_metrics(one))


def test_process_device():
    from types import SimpleNamespace

    from agents.distributed import process_device

    cpu_rank = SimpleNamespace(num_processes=2, device=torch.device("cpu"))
    assert process_device(None, cpu_rank) == torch.device("cpu")
    assert process_device("cpu", cpu_rank) == torch.device("cpu")  # `--device cpu` under torchrun on CPUs
    gpu_rank = SimpleNamespace(num_processes=2, device=torch.device("cuda", 1))
    assert process_device("cuda:1", gpu_rank) == torch.device("cuda", 1)
    with pytest.raises(ValueError, match="'cuda:0' under 2 processes"):
        process_device("cuda:0", gpu_rank)  # every process would pile onto one GPU
    assert (process_device("cuda:0", SimpleNamespace(num_processes=1, device=torch.device("cpu")))
            == torch.device("cuda", 0))


def test_parallel_settings_that_do_not_apply_name_the_fix():
    from agents.lora import LoRAConfig

    with pytest.raises(ValueError, match=r"parallel must be one of \('ddp', 'fsdp'\), got 'zero3'"):
        SFTConfig(parallel="zero3")
    with pytest.raises(ValueError, match="parallel='fsdp' with LoRA .* use parallel='ddp'"):
        PPOConfig(parallel="fsdp", lora=LoRAConfig(rank=8))
    with pytest.raises(ValueError, match="parallel='fsdp' with shared_value_head is not supported yet"):
        PPOConfig(parallel="fsdp", shared_value_head=True)
    for config in (PretrainConfig, DPOConfig, GRPOConfig, RLOOConfig):
        with pytest.raises(ValueError, match="parallel must be one of"):
            config(parallel="deepspeed")
