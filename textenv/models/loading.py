"""Model presets (GPT-2 or Llama architecture, three sizes) and loaders for causal LMs and reward models.

Our models are plain `transformers` models built from a config, saved with `save_pretrained` (safetensors), so
anything we write loads with `AutoModelForCausalLM.from_pretrained` and anything on the hub loads here.
"""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.activations import NewGELUActivation

# n_positions covers the longest prompt + response of the embedded tasks with room to spare.
PRESETS: dict[str, dict] = {
    "tiny": dict(n_layer=2, n_head=2, n_embd=64, n_positions=256),  # tests: seconds
    "small": dict(n_layer=4, n_head=4, n_embd=256, n_positions=256),  # default: the anchor model, 4.3M params
    "medium": dict(n_layer=6, n_head=6, n_embd=384, n_positions=256),  # 12M params
}


ARCHS = ("gpt2", "llama")
"""Architectures a preset builds: GPT-2 (learned positions, LayerNorm, GELU MLP) or Llama (RoPE, RMSNorm, SwiGLU,
grouped-query attention with half the heads as key/value heads, tied embeddings), the structure Llama 3.x, Qwen
and Mistral share."""


def preset_config(preset: str, tokenizer: PreTrainedTokenizerBase, arch: str = "gpt2") -> GPT2Config | LlamaConfig:
    """The config for `preset` in `arch`, sized to the tokenizer, with dropout off (RLHF needs reproducible
    log-probs). A Llama preset has the GPT-2 preset's width, depth, heads and context, an MLP of 8/3 x width
    rounded to 64 (about GPT-2's parameters per block), as `--arch llama` in the TRL anchor builds it."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; choose one of {list(ARCHS)}")
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    special = dict(bos_token_id=bos, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    dims = PRESETS[preset]
    if arch == "llama":
        width, heads = dims["n_embd"], dims["n_head"]
        return LlamaConfig(vocab_size=len(tokenizer), hidden_size=width,
                           intermediate_size=max(64, round(8 * width / 3 / 64) * 64),
                           num_hidden_layers=dims["n_layer"], num_attention_heads=heads,
                           num_key_value_heads=max(1, heads // 2), max_position_embeddings=dims["n_positions"],
                           rms_norm_eps=1e-5, tie_word_embeddings=True, attention_dropout=0.0, **special)
    return GPT2Config(vocab_size=len(tokenizer), resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                      summary_first_dropout=0.0, **special, **dims)


def build_model(preset: str, tokenizer: PreTrainedTokenizerBase, seed: int = 0,
                arch: str = "gpt2") -> GPT2LMHeadModel | LlamaForCausalLM:
    """A freshly initialised causal LM for `preset` in `arch` (deterministic given `seed`)."""
    config = preset_config(preset, tokenizer, arch)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = (LlamaForCausalLM if arch == "llama" else GPT2LMHeadModel)(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return fuse_gelu(model)


def disable_dropout(model: torch.nn.Module) -> torch.nn.Module:
    """Set p=0 on every Dropout module so that train-mode forwards are deterministic (RLHF detail #1)."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return model


def fuse_gelu(model: torch.nn.Module) -> torch.nn.Module:
    """Swap GPT-2's Python GELU (`NewGELUActivation`, eight elementwise ops and as many (B, L, 4E) tensors) for
    torch's fused kernel of the same tanh approximation: equal up to float rounding (2e-7), about a tenth of a
    small model's training step on a CPU. The saved config is untouched."""
    for module in list(model.modules()):
        for name, child in module.named_children():
            if type(child) is NewGELUActivation:
                setattr(module, name, torch.nn.GELU(approximate="tanh"))
    return model


def check_source(name_or_path: str | Path, what: str) -> str:
    """`name_or_path` as a string for `from_pretrained`, after refusing what is certainly no model: a path that
    does not exist (anything that starts with '.', '/' or '~', or has more than one '/': a hub id is 'name' or
    'namespace/name') or a file where a folder is needed. Saves a user transformers' "Repo id must be in the form"
    for a typo in a folder's name."""
    text = str(name_or_path)
    path = Path(text).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ValueError(f"{what} {text!r} is a file; give the folder that holds it (a save_pretrained folder)")
        return str(path)
    if not text.strip() or text.startswith((".", "/", "~")) or text.count("/") > 1 or "\\" in text:
        raise ValueError(f"{what} {text!r}: no such folder (a hub id is 'name' or 'namespace/name')")
    return text


def is_adapter_folder(source: str) -> bool:
    """Whether `source` is a local PEFT adapter folder (adapter_config.json, naming its base model)."""
    return (Path(source) / "adapter_config.json").is_file()


@contextlib.contextmanager
def quiet_peft():
    """Silence the FutureWarning peft triggers by reading a deprecated transformers property
    (`is_gradient_checkpointing`) whenever it wraps a model: the user can do nothing about it."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def load_merged(source: str, auto_class, **kwargs) -> PreTrainedModel:
    """A PEFT adapter folder's base, loaded as `auto_class` (`AutoModelForCausalLM`, or
    `AutoModelForSequenceClassification` with `num_labels`), with the adapter merged in: a plain model. A causal
    LM's adapter merges into its base's trunk under a new scalar head too (a LoRA SFT policy as the reward model's
    or value model's start); a classifier's adapter brings its trained head."""
    from peft import PeftConfig, PeftModel

    config = PeftConfig.from_pretrained(source)
    model = auto_class.from_pretrained(check_source(config.base_model_name_or_path,
                                                    f"the base model of adapter {source!r}"), **kwargs)
    if config.task_type == "CAUSAL_LM" and auto_class is not AutoModelForCausalLM:
        config.task_type = None  # only the trunk's adapter is merged; the task-specific wrapper would want an LM head
    with quiet_peft():
        merged = PeftModel.from_pretrained(model, source, config=config).merge_and_unload()
    return merged.requires_grad_(True)  # peft froze the base for inference; a loaded model trains like any other


def load_causal_lm(
    name_or_path: str | Path, *, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False
) -> PreTrainedModel:
    """Any Hugging Face causal LM, by hub id or local folder, with dropout off. A PEFT adapter folder (a LoRA run's
    model/) loads as its base with the adapter merged in: a plain model, as if saved merged."""
    source = check_source(name_or_path, "causal LM")
    if is_adapter_folder(source):
        model = load_merged(source, AutoModelForCausalLM, dtype=dtype, trust_remote_code=trust_remote_code)
    else:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, trust_remote_code=trust_remote_code,
                                                     use_safetensors=None)
    return fuse_gelu(disable_dropout(model))


def load_sequence_classifier(
    name_or_path: str | Path,
    *,
    num_labels: int | None = None,
    dtype: torch.dtype = torch.float32,
    trust_remote_code: bool = False,
) -> PreTrainedModel:
    """Any Hugging Face sequence-classification model (a reward model), by hub id or local folder, dropout off.

    `num_labels=1` turns a causal LM folder into a scalar model with a new head (a reward or value model). A PEFT
    adapter folder loads merged, as in `load_causal_lm`.
    """
    extra = {} if num_labels is None else {"num_labels": num_labels}
    source = check_source(name_or_path, "sequence classifier")
    if is_adapter_folder(source):
        model = load_merged(source, AutoModelForSequenceClassification, dtype=dtype,
                            trust_remote_code=trust_remote_code, **extra)
    else:
        model = AutoModelForSequenceClassification.from_pretrained(source, dtype=dtype,
                                                                   trust_remote_code=trust_remote_code, **extra)
    return fuse_gelu(disable_dropout(model))
