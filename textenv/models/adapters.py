"""LoRA adapters (peft) on the lean paths: which model a lean path runs, and each linear's weights as it reads them.

A PEFT model (`peft.PeftModel`) is an HF model whose linears peft swapped for LoRA layers, y = W x + b + s B A x
(Hu et al. 2021, https://arxiv.org/abs/2106.09685). The lean paths (`textenv.models.lean`) run it in two ways:

- on packed weights (decoding, a frozen forward): the adapter merged into the base weight once, W + s B A, so a
  decode step costs what the plain model's does (the weights stay fixed while a packed path is used);
- on the live parameters (the RL update): the base multiply plus the adapter's two thin ones, s (x A^T) B^T, so
  gradients reach A and B and the frozen base weight gets none.

`AdapterOff(model)` is the same PEFT model with its adapters switched off: the base, a LoRA policy's frozen
reference. Its lean paths read the base weights alone, in place (`lean.frozen_forward` does not pack them: a packed
copy would hold the second copy of the weights that LoRA saves).

Only a plain LoRA layer is read here: one active adapter, not merged, no DoRA or other variant, no bias on B, no
dropout. Anything else keeps the HF forward, as every module a trunk does not know does.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.pytorch_utils import Conv1D


class AdapterOff:
    """The base of a LoRA (PEFT) model, as the frozen reference: the same model called with its adapter disabled (the
    base weights never change), so no second copy of the weights is held. Called like the model, without
    gradients."""

    def __init__(self, model):
        self.model = model

    def __call__(self, **kwargs):
        with torch.no_grad(), self.model.disable_adapter():
            return self.model(**kwargs)


def unwrap(model) -> tuple[PreTrainedModel, bool] | None:
    """(the HF model a lean path runs, whether its LoRA adapters may apply) for a plain model, a PEFT model or an
    `AdapterOff` (False: the base alone); None for anything else. Where they may, each LoRA layer's own switch
    (peft's `disable_adapters`) still decides, as in the HF forward."""
    if isinstance(model, PreTrainedModel):
        return model, True
    if isinstance(model, AdapterOff):
        inner = unwrap(model.model)
        return None if inner is None else (inner[0], False)
    from peft import PeftModel

    if isinstance(model, PeftModel):
        return model.get_base_model(), True
    return None


def _peft_class(module: str, name: str) -> type | None:
    """A peft class, or None where peft was never imported (then no module is an instance of it)."""
    loaded = sys.modules.get(module)
    return None if loaded is None else getattr(loaded, name)


def _lora_layer() -> type | None:
    """peft's LoRA layer on an nn.Linear or a Conv1D."""
    return _peft_class("peft.tuners.lora.layer", "Linear")


def _plain_adapter(layer) -> str | None:
    """The name of a LoRA layer's one active adapter if the lean paths can read it (see the module docstring)."""
    names = layer.active_adapters
    if layer.merged or len(names) != 1 or names[0] not in layer.lora_A:
        return None
    name = names[0]
    dropout = layer.lora_dropout[name]
    if layer.use_dora.get(name) or layer.lora_bias.get(name) or name in layer.lora_variant:
        return None
    if not (isinstance(dropout, nn.Identity) or (isinstance(dropout, nn.Dropout) and dropout.p == 0.0)):
        return None
    return name


def _modules_to_save() -> type | None:
    """peft's wrapper of a classifier's trained head."""
    return _peft_class("peft.utils.other", "ModulesToSaveWrapper")


def resolve(module: nn.Module, adapters: bool = True) -> nn.Module:
    """The module a peft wrapper stands for, as the HF forward runs it now: a `ModulesToSaveWrapper` (a PEFT
    classifier's trained head) its active copy, or its original where the adapters are off; anything else itself."""
    wrapper = _modules_to_save()
    if wrapper is not None and isinstance(module, wrapper):
        if not adapters or module.disable_adapters or module.active_adapter not in module.modules_to_save:
            return module.original_module
        return module.modules_to_save[module.active_adapter]
    return module


def plain_type(module: nn.Module) -> type:
    """The type a trunk checks a module against: a readable LoRA layer counts as its base layer's type (a LoRA
    layer the lean paths cannot read keeps its own type, which no trunk expects)."""
    module = resolve(module)
    lora = _lora_layer()
    if lora is not None and isinstance(module, lora):
        return type(module.base_layer) if _plain_adapter(module) is not None else type(module)
    return type(module)


class Adapter(NamedTuple):
    """A LoRA adapter on one linear: y += scaling * (x @ A^T) @ B^T."""

    A: torch.Tensor  # (r, in)
    B: torch.Tensor  # (out, r)
    scaling: float


def linear_parts(module: nn.Module, adapters: bool) -> tuple[torch.Tensor, torch.Tensor | None, Adapter | None]:
    """A linear's (weight as x @ W reads it, (in, out); bias; adapter) as the lean paths read it, for an nn.Linear,
    GPT-2's Conv1D or a LoRA layer on either. The adapter is None for a plain linear, and where `adapters` is False
    (an `AdapterOff`) or peft's own switch has it off. A `ModulesToSaveWrapper` reads as the copy that runs."""
    module = resolve(module, adapters)
    lora = _lora_layer()
    adapter = None
    if lora is not None and isinstance(module, lora):
        name = _plain_adapter(module)
        if adapters and not module.disable_adapters and name is not None:
            adapter = Adapter(module.lora_A[name].weight, module.lora_B[name].weight, float(module.scaling[name]))
        module = module.base_layer
    weight = module.weight if isinstance(module, Conv1D) else module.weight.t()  # Conv1D stores (in, out) already
    return weight, module.bias, adapter


def merged(weight: torch.Tensor, adapter: Adapter | None) -> torch.Tensor:
    """An (in, out) weight with the adapter folded in, W + s (B A)^T (the weight itself without one)."""
    return weight if adapter is None else weight + adapter.scaling * (adapter.B @ adapter.A).t()


def lean_linear(linear: Callable, module: nn.Module, packed: bool, adapters: bool, gelu: str | None = None):
    """One of a trunk's linears as `linear` (a lean path's factory, `linear(weight (in, out), bias, gelu=None)`) makes
    it: on packed weights with the adapter merged in; on the live parameters with the adapter live (`Adapted`)."""
    weight, bias, adapter = linear_parts(module, adapters)
    if packed or adapter is None:
        return linear(merged(weight, adapter), bias, gelu=gelu)
    return Adapted(linear(weight, bias), adapter, gelu)


class Adapted:
    """x @ W + b through `base` (a lean path's linear on the frozen base weight), plus the adapter's live
    s (x A^T) B^T, then the GELU (F.gelu's `approximate`, or None) where the linear has one: gradients reach A and B,
    and only the two thin multiplies are added to the base's."""

    def __init__(self, base: Callable, adapter: Adapter, gelu: str | None = None):
        self.base, self.adapter, self.gelu = base, adapter, gelu

    def __call__(self, x: torch.Tensor) -> torch.Tensor:  # (M, in) -> (M, out)
        a = self.adapter
        y = torch.addmm(self.base(x), x @ a.A.t(), a.B.t(), alpha=a.scaling)  # + s (x A^T) B^T, (M, out)
        return y if self.gelu is None else F.gelu(y, approximate=self.gelu)
