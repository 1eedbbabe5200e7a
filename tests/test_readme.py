"""The README's custom-reward-model example runs as written (with a tiny reward model in place of the run's)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
from transformers import GPT2Config, GPT2ForSequenceClassification

from textenv.embedded import default_tokenizer

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_custom_reward_model_example(tmp_path):
    tok = default_tokenizer()
    config = GPT2Config(n_layer=1, n_head=2, n_embd=32, vocab_size=len(tok), num_labels=1,
                        pad_token_id=tok.pad_token_id)
    rm = tmp_path / "rm"
    GPT2ForSequenceClassification(config).save_pretrained(rm)
    tok.save_pretrained(rm)
    section = README.read_text().split("### Your own prompts, tokenizer and reward")[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert "runs/default/rm/model" in code
    namespace: dict = {}
    exec(compile(code.replace("runs/default/rm/model", str(rm)), "README.md", "exec"), namespace)
    envs, obs = namespace["envs"], namespace["obs"]
    assert obs["input_ids"].shape[0] == 8
    _, rewards, terminated, _, _ = envs.step(np.full(8, tok.eos_token_id))
    assert terminated.all() and np.isfinite(rewards).all()


def test_readme_multiturn_example(capsys):
    section = README.read_text().split("### Environments that answer back (multi-turn)")[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    obs, info, reward = namespace["obs"], namespace["info"], namespace["reward"]
    assert info["turn"] == 1 and reward == -0.05  # 50 is not the secret drawn by seed 0
    shown = capsys.readouterr().out
    assert "assistant:\n50" in shown and shown.rstrip().endswith("assistant:")
    assert ("user:\nhigher" in shown) != ("user:\nlower" in shown)  # the env's reply is in the stream
    agent = obs["input_ids"][obs["agent_mask"] == 1].tolist()
    chat = namespace["chat"]
    assert agent == chat.encode("50") + [chat.end_of_turn]


def test_readme_trains_the_user_written_multiturn_env(tmp_path, capsys):
    """The README's training block, on the env its multi-turn block registers, with a tiny policy in place of the
    main job's SFT model."""
    from textenv.models import build_model

    tok = default_tokenizer()
    policy = tmp_path / "sft"
    build_model("tiny", tok, seed=0).save_pretrained(policy)
    tok.save_pretrained(policy)
    text = README.read_text()
    define = re.search(r"```python\n(.*?)```", text.split("### Environments that answer back (multi-turn)")[1], re.S)
    train = re.search(r"```python\n(.*?)```", text.split("### The recipe on a multi-turn env")[1], re.S).group(1)
    assert "runs/default/sft/model" in train and "runs/guess-ppo" in train
    namespace: dict = {}
    exec(compile(define.group(1), "README.md", "exec"), namespace)
    out = tmp_path / "guess-ppo"
    train = train.replace("runs/default/sft/model", str(policy)).replace("runs/guess-ppo", str(out))
    exec(compile(train, "README.md", "exec"), namespace)
    assert (out / "model" / "model.safetensors").exists()
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]
    sample = json.loads((out / "samples.jsonl").read_text().splitlines()[-1])
    assert sample["messages"][0]["content"].startswith("Guess my number (1-100)")
