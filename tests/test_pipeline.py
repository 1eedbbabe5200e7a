"""`textenv pipeline --preset tiny` end to end: every artefact exists and loads, reruns skip, bad input is refused."""

from __future__ import annotations

import json
import re

import pytest
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from agents.cli import main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def run(tiny_run):
    return tiny_run


def test_every_artefact_exists_and_loads(run):
    for stage in ("pretrain", "sft", "ppo"):
        AutoModelForCausalLM.from_pretrained(run / stage / "model")
        AutoTokenizer.from_pretrained(run / stage / "model")
        assert (run / stage / "model" / "model.safetensors").exists()
    rm = AutoModelForSequenceClassification.from_pretrained(run / "rm" / "model")
    assert rm.config.num_labels == 1
    for stage in ("pretrain", "sft", "rm", "ppo"):
        rows = [json.loads(line) for line in (run / stage / "metrics.jsonl").read_text().splitlines()]
        assert rows and all("step" in r for r in rows), stage
        assert any((run / stage / "tb").iterdir()), stage
        json.loads((run / stage / "summary.json").read_text())
    assert (run / "comparisons" / "comparisons.jsonl").exists()
    plots = sorted((run / "plots").glob("*.png"))
    assert {p.name for p in plots} >= {"pretrain_loss.png", "sft_loss.png", "rm_accuracy.png", "ppo_scores.png",
                                       "ppo_kl.png", "gold_vs_sqrt_kl.png"}
    for p in plots:
        assert p.read_bytes()[:8] == PNG_MAGIC, p
    report = (run / "report.md").read_text()
    assert "| pretrained (few-shot) |" in report and "| SFT |" in report and "| PPO |" in report
    evals = json.loads((run / "eval.json").read_text())
    assert set(evals) == {"pretrained (few-shot)", "SFT", "PPO"}
    assert len((run / "ppo" / "samples.jsonl").read_text().splitlines()) > 0


def test_rerun_skips_completed_stages_and_changes_nothing(run, capsys):
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*.safetensors")}
    main(["pipeline", "--preset", "tiny", "--out-dir", str(run)])
    assert capsys.readouterr().out.count("already complete") == 5
    assert before == {p: p.stat().st_mtime_ns for p in run.rglob("*.safetensors")}


def test_bad_input(run, tmp_path, capsys):
    """A user's mistake prints its message, no traceback, and exits 2; --traceback raises it instead."""

    def error(*args: str) -> str:
        with pytest.raises(SystemExit) as exit_info:
            main(["pipeline", *args])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("textenv: error: ") and "Traceback" not in err
        return err

    assert re.search("different configuration .*seed", error("--preset", "tiny", "--out-dir", str(run), "--seed", "1"))
    with pytest.raises(ValueError, match="different configuration .*seed"):
        main(["pipeline", "--preset", "tiny", "--out-dir", str(run), "--seed", "1", "--traceback"])
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    assert "not a run folder" in error("--preset", "tiny", "--out-dir", str(foreign))
    assert (foreign / "notes.txt").read_text() == "mine"
    assert "unknown task 'poetry'" in error("--task", "poetry", "--out-dir", str(tmp_path / "x"))
    assert "unknown preset 'huge'" in error("--preset", "huge", "--out-dir", str(tmp_path / "y"))
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    assert re.search("not writable: .*is a file", error("--preset", "tiny", "--out-dir", str(a_file / "run")))


def test_a_pipeline_killed_in_sft_and_rerun_evaluates_as_the_uninterrupted_one(run, tmp_path):
    """#21 item 9: the stages before the RM (pretrain, SFT, collect) must resume to the same eval.json, the samples
    and scores included; only the run folder's path differs."""
    import sys

    from tests.conftest import kill_after_checkpoint

    out = tmp_path / "run"
    command = [sys.executable, "-m", "agents.cli", "pipeline", "--preset", "tiny", "--out-dir", str(out)]
    kill_after_checkpoint(command, out / "sft", at=1)
    assert (out / "pretrain" / "model").is_dir() and not (out / "sft" / "model").exists()
    main(command[3:])  # the rerun: the same command, in this process
    resumed = (out / "eval.json").read_text().replace(str(out), "RUN")
    assert resumed == (run / "eval.json").read_text().replace(str(run), "RUN")


def test_the_tiny_pipeline_on_a_llama_model_with_lora_stages(tmp_path):
    """`--arch llama` runs the whole recipe on a Llama-style model built from config (the RM keeps the shift its
    bias-free head cannot carry in its config), and a stage's LoRA settings pass through: SFT and PPO write PEFT
    adapter folders that the next stages and the evaluation read."""
    from rewards.hf import reward_shift

    out = tmp_path / "run"
    main(["pipeline", "--preset", "tiny", "--arch", "llama", "--out-dir", str(out), "--sft.lora.rank", "4",
          "--ppo.lora.rank", "4"])
    assert AutoModelForCausalLM.from_pretrained(out / "pretrain" / "model").config.model_type == "llama"
    for stage in ("sft", "ppo"):
        assert (out / stage / "model" / "adapter_config.json").exists(), stage
    rm = AutoModelForSequenceClassification.from_pretrained(out / "rm" / "model")
    assert rm.config.model_type == "llama" and reward_shift(rm.config) != 0.0
    evals = json.loads((out / "eval.json").read_text())
    assert set(evals) == {"pretrained (few-shot)", "SFT", "PPO"}
