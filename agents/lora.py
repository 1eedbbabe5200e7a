"""LoRA adapters (through `peft`) for every trainer: the settings, wrapping a model, the reference policy as the base
with the adapter switched off, and the merged folder a run writes on request.

With `rank > 0` a trainer trains a LoRA adapter (Hu et al. 2021, https://arxiv.org/abs/2106.09685) instead of every
weight: the base stays frozen, so the reference policy of PPO, GRPO and RLOO is the same model with the adapter
disabled, and no second copy of the weights is loaded. The adapter starts at zero (B = 0), so at the first step the
policy is the reference and the KL is 0. A run's `model/` is then a PEFT adapter folder (adapter_config.json,
adapter_model.safetensors, the tokenizer) that `peft.AutoPeftModelForCausalLM` loads; `merge = True` also writes
`merged/`, the base with the adapter folded in, a plain `save_pretrained` folder. Every loader here
(`textenv.models.load_causal_lm`) reads an adapter folder as its merged model, so a later stage takes it as it is.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

from transformers import PreTrainedModel

from textenv.models import load_causal_lm
from textenv.models.adapters import AdapterOff  # noqa: F401  (the reference, importable from here as before)
from textenv.models.loading import quiet_peft


@dataclass
class LoRAConfig:
    rank: int = 0
    """LoRA rank r; 0 trains every weight (full fine-tuning)."""
    alpha: float = 16.0
    """LoRA alpha: the adapter's update is (alpha / rank) * B A."""
    dropout: float = 0.0
    """Dropout on the adapter's input. 0 keeps log-probs reproducible, as RLHF needs (dropout off everywhere)."""
    target_modules: list[str] | None = None
    """Names of the linear modules to adapt (peft's `target_modules`, e.g. q_proj v_proj); None: every linear layer
    of the trunk (peft's 'all-linear'; a sequence classifier's score head is trained in full)."""
    merge: bool = False
    """Also write out_dir/merged: the base with the adapter merged in, a plain save_pretrained folder."""

    def __post_init__(self):
        if not (isinstance(self.rank, int) and self.rank >= 0):
            raise ValueError(f"lora rank must be an integer >= 0 (0: full fine-tuning), got {self.rank!r}")
        if not self.alpha > 0:
            raise ValueError(f"lora alpha must be > 0, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora dropout must be in [0, 1), got {self.dropout!r}")
        if self.target_modules is not None and not self.target_modules:
            raise ValueError("lora target_modules is empty; give module names (e.g. q_proj v_proj) or leave it unset")


def with_lora(model: PreTrainedModel, cfg: LoRAConfig, task_type: str):
    """`model` with a fresh LoRA adapter (a `peft.PeftModel`; only the adapter, and a classifier's head, train), or
    `model` itself when `cfg.rank` is 0. `task_type`: 'CAUSAL_LM' or 'SEQ_CLS'."""
    if cfg.rank == 0:
        return model
    from peft import LoraConfig, get_peft_model

    source = Path(model.config.name_or_path)  # the adapter folder names its base: absolute, to load from anywhere
    if source.is_dir():
        model.config.name_or_path = str(source.resolve())
    targets = cfg.target_modules or "all-linear"
    lora = LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=targets,
                      task_type=task_type, fan_in_fan_out=model.config.model_type == "gpt2")  # GPT-2's Conv1D
    try:
        with quiet_peft():
            return get_peft_model(model, lora)
    except ValueError as exc:  # e.g. a target module the model does not have
        raise ValueError(f"lora target_modules={cfg.target_modules!r} do not fit {type(model).__name__}: "
                         f"{exc}") from None


def is_adapted(model) -> bool:
    """Whether `model` trains a LoRA adapter (a `peft.PeftModel`). A plain model needs no peft import to tell."""
    if isinstance(model, PreTrainedModel):
        return False
    from peft import PeftModel

    return isinstance(model, PeftModel)


def reference_policy(policy, source: str, device):
    """The frozen reference for the KL: a LoRA policy with its adapter off (the base never trains; the lean paths
    read its base weights in place), else a second copy of `source` (the policy's folder), frozen."""
    if is_adapted(policy):
        return AdapterOff(policy)
    return load_causal_lm(source).to(device).eval().requires_grad_(False)


def merged_copy(model) -> PreTrainedModel:
    """A LoRA model's base with the adapter merged in, as a new plain model (the trained one is left as it is)."""
    return copy.deepcopy(model).merge_and_unload()
