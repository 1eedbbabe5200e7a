"""Process-wide switches: whether bf16 autocast pays on this machine, and glibc's malloc keeping freed memory."""

from __future__ import annotations

import ctypes
import os
import platform

import torch


def bf16_is_fast() -> bool:
    """Whether bfloat16 autocast speeds training up on this machine, the trainers' default for it: on a CUDA GPU that
    supports bf16, and on a CPU with AMX tiles, where oneDNN multiplies bf16 on them. A CPU without AMX (AVX512-BF16
    alone) multiplies bf16 at about half its fp32 speed (166 vs 330 GFLOP/s on this project's 2-core dev machine),
    and there autocast made pretraining, SFT and the reward model about 2x slower, so they default to fp32."""
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    return torch.cpu._is_amx_tile_supported()  # the test inductor uses to pick its AMX kernels


# keep_freed_memory()'s two settings as glibc tunables, for a process that should run with them from its start
# (benchmarks/trl_speed.py gives them to both sides); glibc's tunables set the same fields mallopt does, the dynamic
# mmap threshold switched off as well
KEEP_FREED_TUNABLES = "glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=1073741824"


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse instead of returning it to the OS; process-wide, so the
    `textenv` command calls it once at startup (a script that calls the trainers directly may too).

    By default glibc serves a large block (from 128 KiB, the threshold growing with what is freed, up to 32 MiB)
    with a fresh mmap and unmaps it on free, and trims the heap's free top: every step's activation tensors then
    come back as new pages, zero-filled through page faults. Measured on one PPO update epoch of the anchor
    setting (2 threads): 24k-140k minor faults an epoch, ~0 with these settings, and 4-5% less time per PPO
    iteration (paired, same process); peak RSS unchanged. Returns False, changing nothing, off glibc or where the
    user set malloc's tunables already (GLIBC_TUNABLES or MALLOC_*_ environment variables)."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    if "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", "") or any(k.startswith("MALLOC_") for k in os.environ):
        return False
    libc = ctypes.CDLL(None)  # the running process's C library
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # <malloc.h>
    # mmap only blocks over 32 MiB (the largest threshold glibc accepts on 64-bit); trim only past 1 GiB free
    return bool(libc.mallopt(M_MMAP_THRESHOLD, 32 << 20)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 1 << 30))
