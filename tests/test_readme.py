"""The README's custom-reward-model example runs as written (with a tiny reward model in place of the run's)."""

from __future__ import annotations

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
