"""LoRA through peft in the trainers (agents/lora.py): a PEFT policy's log-probs are its merged model's and with the
adapter off the base's; the adapter starts at zero, so the first rollout's KL to the reference is 0; training
changes every adapter parameter (and a classifier's head) and no base parameter; the adapter folder loads with
plain peft and equals the merged folder; bad settings are named."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from agents.lora import AdapterOff, LoRAConfig, merged_copy, with_lora
from agents.policy import policy_forward
from textenv.models import build_model, load_causal_lm, load_sequence_classifier
from textenv.models.tokens import pad_rows
from textenv.tokenizer import load_tokenizer

# a tiny random policy rarely ends with EOS: without the missing-EOS penalty the length reward varies in a group
RL = ["--reward", "tests.conftest:length_reward", "--max-new-tokens", "6", "--iterations", "2", "--device", "cpu",
      "--missing-eos-penalty", "None", "--lora.rank", "4", "--lora.merge"]


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def base_folder(request, tmp_path_factory):
    from textenv.embedded import default_tokenizer

    folder = tmp_path_factory.mktemp(request.param)
    tok = default_tokenizer()
    build_model("tiny", tok, seed=0, arch=request.param).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def trained_adapter(folder):
    """A LoRA policy on `folder` whose adapter is not zero, as after training."""
    model = with_lora(load_causal_lm(folder), LoRAConfig(rank=4), "CAUSAL_LM")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.2, generator=torch.Generator().manual_seed(len(name)))
    return model


def test_peft_logprobs_are_the_merged_models_and_adapter_off_is_the_base(base_folder):
    ids, mask = pad_rows([[5, 6, 7, 8, 9, 10, 11], [12, 13, 14, 15, 16]], 0, side="left")  # (2, 7), one left-padded
    P = 3
    real = mask[:, P:].bool()
    lora = trained_adapter(base_folder)
    with torch.no_grad():
        got = policy_forward(lora, ids, mask, P, 0.7)[0]  # the HF forward through peft's layers
        merged = policy_forward(merged_copy(lora), ids, mask, P, 0.7)[0]  # a plain model: the lean forward
        off = policy_forward(AdapterOff(lora), ids, mask, P, 0.7)[0]
        base = policy_forward(load_causal_lm(base_folder), ids, mask, P, 0.7)[0]
    torch.testing.assert_close(got[real], merged[real], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(off[real], base[real], atol=1e-5, rtol=1e-5)
    assert (got[real] - base[real]).abs().max() > 1e-3  # the adapter changes the policy


def test_an_adapter_folder_loads_merged_everywhere(base_folder, tmp_path):
    """`load_causal_lm` reads a LoRA run's model/ as its merged model; `load_sequence_classifier` puts the merged
    trunk under a new scalar head (a LoRA SFT policy as the RM's start)."""
    lora = trained_adapter(base_folder)
    lora.save_pretrained(tmp_path)
    ids = torch.randint(3, 90, (2, 6))
    loaded = load_causal_lm(tmp_path)
    assert all(p.requires_grad for p in loaded.parameters())  # trainable, as a model from from_pretrained
    with torch.no_grad():
        want = merged_copy(lora)(input_ids=ids).logits
        torch.testing.assert_close(loaded(input_ids=ids).logits, want, atol=1e-5, rtol=1e-5)
        classifier = load_sequence_classifier(tmp_path, num_labels=1)
        trunk = classifier.base_model(input_ids=ids).last_hidden_state
        torch.testing.assert_close(trunk, merged_copy(lora).base_model(input_ids=ids).last_hidden_state,
                                   atol=1e-5, rtol=1e-5)


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing")  # plain peft's, loading model/ below
@pytest.mark.parametrize("trainer", ["ppo", "grpo"])
def test_rl_with_lora_starts_at_the_reference_and_trains_only_the_adapter(policy_folder, tmp_path, monkeypatch,
                                                                         trainer):
    """PPO (policy and value model) and GRPO with LoRA: the first rollout's KL is 0; every adapter parameter and the
    value model's head change, no base parameter does; model/ loads with plain peft and equals merged/."""
    import importlib

    from peft import AutoPeftModelForCausalLM

    from tests.test_resume_every_stage import run_here

    module = importlib.import_module("agents.ppo" if trainer == "ppo" else "agents.groups")
    made, real = [], module.with_lora

    def recording(model, cfg, task_type):  # what the trainer builds, and its parameters as built
        model = real(model, cfg, task_type)
        made.append((task_type, model, {n: p.detach().clone() for n, p in model.named_parameters()}))
        return model

    monkeypatch.setattr(module, "with_lora", recording)
    sizes = ["--num-envs", "8"] if trainer == "ppo" else ["--num-prompts", "2", "--num-generations", "4",
                                                          "--update-epochs", "2"]
    out = tmp_path / "run"
    run_here(trainer, ["--policy", str(policy_folder), *RL, *sizes, "--out-dir", str(out)])
    assert [t for t, _, _ in made] == (["CAUSAL_LM", "SEQ_CLS"] if trainer == "ppo" else ["CAUSAL_LM"])
    first = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert abs(first["objective/kl"]) < 1e-5  # B = 0 at the start: the policy is the reference
    for task_type, model, before in made:
        adapter = [n for n, _ in model.named_parameters() if "lora_" in n or "modules_to_save" in n]
        assert adapter and all(before[n].shape for n in adapter)
        for name, p in model.named_parameters():
            if name in adapter:
                assert not torch.equal(p, before[name]), f"{task_type} {name} did not train"
            else:
                assert torch.equal(p, before[name]), f"{task_type} base parameter {name} changed"
    ids = torch.randint(3, 90, (2, 6))
    with torch.no_grad():
        plain_peft = AutoPeftModelForCausalLM.from_pretrained(out / "model")(input_ids=ids).logits
        merged = AutoModelForCausalLM.from_pretrained(out / "merged")(input_ids=ids).logits
    torch.testing.assert_close(plain_peft, merged, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("bad,match", [(dict(rank=-1), "rank"), (dict(rank=2.5), "rank"), (dict(alpha=0), "alpha"),
                                       (dict(dropout=1.0), "dropout"), (dict(target_modules=[]), "target_modules")])
def test_bad_lora_settings_are_named(bad, match):
    with pytest.raises(ValueError, match=match):
        LoRAConfig(**bad)


def test_a_target_module_the_model_lacks_is_named(policy_folder):
    with pytest.raises(ValueError, match="q_proj"):
        with_lora(load_causal_lm(policy_folder), LoRAConfig(rank=2, target_modules=["q_proj"]), "CAUSAL_LM")


def test_a_lora_reward_model_writes_its_merged_normalised_model_and_its_adapter(tiny_run, tmp_path):
    """The RM's model/ is the plain model the RL stages read (the adapter merged, then the normalisation folded in:
    mean 0 on the reference responses); adapter/ is the trained adapter, which plain peft loads."""
    from peft import PeftModel

    from agents.preferences import load_preferences
    from agents.reward_model import score_texts
    from tests.test_resume_every_stage import run_here

    out = tmp_path / "rm"
    run_here("reward_model", ["--data", str(tiny_run / "comparisons"), "--model", str(tiny_run / "sft" / "model"),
                              "--batch-size", "4", "--n-eval-samples", "4", "--n-reference", "64", "--lora.rank", "4",
                              "--out-dir", str(out)])
    assert (out / "model" / "model.safetensors").exists() and (out / "adapter" / "adapter_config.json").exists()
    model = load_sequence_classifier(out / "model")
    summary = json.loads((out / "summary.json").read_text())
    rows = load_preferences(tiny_run / "comparisons").rows  # as the stage reads them
    pairs = [(r["prompt"], x) for r in rows for x in r["responses"]]
    pick = np.random.default_rng(0).permutation(len(pairs))[:64]  # the stage's reference responses (seed 0)
    tok = load_tokenizer(out / "model")
    scores = score_texts(model, tok, [pairs[i][0] for i in pick], [pairs[i][1] for i in pick], batch_size=16,
                         max_length=256)
    assert abs(scores.mean().item()) < 1e-4 and summary["normalization"]["mean"] != 0.0
    base = load_sequence_classifier(tiny_run / "sft" / "model", num_labels=1)
    assert isinstance(PeftModel.from_pretrained(base, out / "adapter"), PeftModel)


def test_a_lora_checkpoint_holds_the_adapter_and_refuses_another_base(base_folder, tmp_path):
    """A LoRA checkpoint stores what trains (not the base, which a resume reloads from the run's source); it restores
    the adapter and its optimizer state exactly, and a base that changed since is refused by name."""
    from safetensors.torch import load_file

    from agents.run import load_checkpoint, save_checkpoint

    def fresh(folder):
        model = with_lora(load_causal_lm(folder), LoRAConfig(rank=4), "CAUSAL_LM")
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-3)
        return model, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)

    model, optimizer, scheduler = fresh(base_folder)
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.randn_like(p)
    optimizer.step()  # the adapter moves off zero and Adam's moments fill
    save_checkpoint(tmp_path / "checkpoint", model, optimizer, scheduler, {"step": 1})
    saved = load_file(tmp_path / "checkpoint" / "model.safetensors")
    assert saved and all("lora_" in k for k in saved)  # the adapter only
    base_bytes = sum(f.stat().st_size for f in base_folder.glob("*.safetensors"))
    assert (tmp_path / "checkpoint" / "model.safetensors").stat().st_size < base_bytes / 4

    resumed, resumed_optimizer, resumed_scheduler = fresh(base_folder)
    assert load_checkpoint(tmp_path / "checkpoint", resumed, resumed_optimizer, resumed_scheduler) == {"step": 1}
    want, got = model.state_dict(), resumed.state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    a, b = optimizer.state_dict()["state"], resumed_optimizer.state_dict()["state"]
    assert a.keys() == b.keys() and all(torch.equal(a[i][k], b[i][k]) for i in a for k in a[i])

    other = tmp_path / "other-base"  # the source folder rewritten with other weights since the checkpoint
    changed = load_causal_lm(base_folder)
    with torch.no_grad():
        next(changed.parameters()).add_(0.01)
    changed.save_pretrained(other)
    with pytest.raises(ValueError, match="another base model"):
        load_checkpoint(tmp_path / "checkpoint", *fresh(other))
