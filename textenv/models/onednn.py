"""x @ W + b, the two ways the lean paths multiply: on weights reordered once into oneDNN's layout (frozen models,
decoding), and on the live weights with autograd (the RL update: oneDNN's linear, or MKL's `mm` on Intel CPUs, where
it measured faster; `update_on_onednn`). Elsewhere (CUDA, other dtypes) both are plain `addmm`.

The ops are the ones inductor emits for CPU linears (`torch.ops.mkldnn._reorder_linear_weight` /
`_linear_pointwise`): private API, pinned by tests/test_decoding.py and tests/test_gpt2_forward.py.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

import torch
import torch.nn.functional as F


def _onednn_ok(weight: torch.Tensor) -> bool:
    return weight.device.type == "cpu" and weight.dtype == torch.float32 and torch.backends.mkldnn.is_available()


@functools.cache
def cpu_vendor() -> str:
    """This CPU's vendor id as Linux reports it ("GenuineIntel", "AuthenticAMD"); "" where /proc/cpuinfo is not."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux
        return ""
    found = re.search(r"^vendor_id\s*:\s*(\S+)", text, re.MULTILINE)
    return found.group(1) if found else ""


def update_on_onednn() -> bool:
    """Whether `Affine` multiplies on oneDNN's linear (True) or `torch.mm` (False) on this CPU.

    `torch.mm` runs on MKL, which is tuned for Intel's CPUs. There it was the faster of the two for a whole
    forward and backward of the update (Intel Xeon with AVX-512 and AMX, 2026-12-06, small presets, 16 + 48
    tokens): Llama 68.9 against 80.8 ms at an 8-row micro-batch (our trainers' default), 240 against 248 at 32
    rows; GPT-2 64.1 against 70.5 and 241 against 244. On the AMD EPYC where `_OneDNNAffine` was written, oneDNN's
    linear was 4-20% faster than `mm` at these shapes (1-2% of a PPO update). So: `mm` on Intel, oneDNN elsewhere."""
    return cpu_vendor() != "GenuineIntel"


class PackedLinear:
    """x @ W + b for a weight W (in, out) that does not change while this object is used.

    On a CPU with oneDNN (float32), W is reordered once into oneDNN's blocked layout for `rows`-row inputs (any row
    count still works). At 32 rows, a decode step's shapes, that runs 1.3-2x faster than MKL's `addmm` here (AMD
    EPYC with AVX-512: 256x4096 in 337 against 663 us), and the whole 48-token decode of the anchor model 22-30%
    faster. `gelu` (F.gelu's `approximate`, or None) is applied after, as oneDNN's post-op inside the matrix
    multiply's output pass."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, rows: int, gelu: str | None = None):
        self.bias, self.gelu = bias, gelu
        self.packed = _onednn_ok(weight)
        # oneDNN takes nn.Linear's (out, in) layout
        self.weight = torch.ops.mkldnn._reorder_linear_weight(weight.t().contiguous(), rows) if self.packed else weight

    def __call__(self, x: torch.Tensor) -> torch.Tensor:  # (M, in) -> (M, out)
        if self.packed:
            post, algorithm = ("none", "") if self.gelu is None else ("gelu", self.gelu)
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, post, [], algorithm)
        y = x @ self.weight if self.bias is None else torch.addmm(self.bias, x, self.weight)
        return y if self.gelu is None else F.gelu(y, approximate=self.gelu)


class Affine:
    """x @ W + b on the live parameters, W (in, out), with autograd (HF's Conv1D computes this as an addmm).

    `onednn`: the forward and the input gradient on oneDNN's linear (`_OneDNNAffine`) rather than MKL's `mm`,
    which PyTorch otherwise calls; None leaves it to this CPU (`update_on_onednn`). Only a float32 CPU weight
    can."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, gelu: str | None = None,
                 onednn: bool | None = None):
        self.weight, self.bias, self.gelu = weight, bias, gelu  # gelu: F.gelu's `approximate`, applied after
        self.onednn = _onednn_ok(weight) and (update_on_onednn() if onednn is None else onednn)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.onednn:
            y = _OneDNNAffine.apply(x, self.weight, self.bias)
        else:
            y = x @ self.weight if self.bias is None else torch.addmm(self.bias, x, self.weight)
        return y if self.gelu is None else F.gelu(y, approximate=self.gelu)


class _OneDNNAffine(torch.autograd.Function):
    """x @ W + b, W (in, out), by oneDNN's linear (weights as they are, not reordered); the weight gradient by
    `mm` (oneDNN was not faster for it here). `_linear_pointwise` has no autograd formula of its own, hence this
    Function."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        # oneDNN takes nn.Linear's (out, in) layout: y = x @ weight.t().t()
        return torch.ops.mkldnn._linear_pointwise(x, weight.t(), bias, "none", [], "")  # (M, out)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        grad = grad.contiguous()  # (M, out)
        dx = torch.ops.mkldnn._linear_pointwise(grad, weight, None, "none", [], "") if ctx.needs_input_grad[0] else None
        dw = x.t() @ grad if ctx.needs_input_grad[1] else None  # (in, out)
        db = grad.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None  # (out,)
        return dx, dw, db
