"""A lower bound on the time of one RL iteration on this machine: its matrix multiplies at measured GEMM speed.

Every trainer in the anchor setting (ours and TRL's alike) must do the same matrix multiplies: generation, the
reference, value and reward forwards, and the update's forward and backward passes. Their FLOPs are fixed by
the setting; this script counts them GEMM by GEMM, times `torch.mm` at each GEMM's shape on this machine (the
best of several runs, at the benchmark's thread count), and adds up FLOPs / rate. Everything else (attention
softmax, layer norms, GELU, the optimizer, Python) is left out, so no implementation in this precision that
multiplies through `torch.mm` (MKL here) can be faster than the floor. Dividing a measured iteration time by it
bounds the speed-up any other such trainer could have:

    TRL s/iter / floor s/iter  = the largest speed-up over TRL that equal FLOPs allow on this machine.

    python -m benchmarks.gemm_floor                        # the anchor setting, PPO, GRPO and RLOO
    python -m benchmarks.gemm_floor --epochs 4 --threads 2

The GEMMs are a block's four linears (GPT-2: qkv, attention out, fc, mlp out; Llama, `--arch llama`: the fused qkv
with half the heads as key/value heads, attention out, the fused gate/up, down) and the tied LM head. The
attention products (about 4% of the FLOPs here) are left out too, which keeps the floor a lower bound whatever
attention kernel one uses.
Generation runs the LM head on one position per row and step, the scoring forwards on the T response positions
only (as `agents.policy.policy_forward` does). Token counts assume every response runs the full T tokens.
Other kernels can beat `torch.mm` at some shapes: oneDNN's prepacked linear, which our decoder uses
(`textenv.models.onednn.PackedLinear`), runs a decode step's 32-row GEMMs 1.3-2x faster on this AMD EPYC, so our
generation can come in under its share of the floor.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from typing import NamedTuple

import torch


@dataclass(frozen=True)
class Setting:
    n_layer: int = 4
    n_embd: int = 256
    n_head: int = 4
    vocab: int = 4096
    batch: int = 32
    prompt_len: int = 16
    response_len: int = 48
    arch: str = "gpt2"
    n_kv_head: int | None = None  # llama: key/value heads (None: n_head)
    intermediate: int | None = None  # llama: the SwiGLU MLP's width (None: 4 x n_embd)

    @classmethod
    def of(cls, config, **shapes) -> Setting:
        """The setting of a preset's config (GPT-2 or Llama) at these batch shapes."""
        if config.model_type == "llama":
            return cls(n_layer=config.num_hidden_layers, n_embd=config.hidden_size,
                       n_head=config.num_attention_heads, vocab=config.vocab_size, arch="llama",
                       n_kv_head=config.num_key_value_heads, intermediate=config.intermediate_size, **shapes)
        return cls(n_layer=config.n_layer, n_embd=config.n_embd, n_head=config.n_head, vocab=config.vocab_size,
                   **shapes)


class Gemm(NamedTuple):
    """`times` products of an (m, k) by a (k, n) matrix in `phase`; `split` ("m", "k" or "") names the token
    dimension, the one a trainer can split by chunking its batch."""

    phase: str
    m: int
    k: int
    n: int
    times: int
    split: str


def trunk(M: int, s: Setting, phase: str, backward: bool = False) -> list[Gemm]:
    """The transformer blocks' four linears over M tokens (and, for a backward pass, their two products each)."""
    E = s.n_embd
    if s.arch == "llama":
        kv, inner = 2 * (s.n_kv_head or s.n_head) * (E // s.n_head), s.intermediate or 4 * E
        linears = [(E, E + kv), (E, E), (E, 2 * inner), (inner, E)]  # q/k/v, o, gate/up, down
    else:
        linears = [(E, 3 * E), (E, E), (E, 4 * E), (4 * E, E)]  # c_attn, attn c_proj, c_fc, mlp c_proj
    out = [Gemm(phase, M, k, n, s.n_layer, "m") for k, n in linears]
    if backward:  # d input = dY W^T (the first block's feeds the embeddings' gradient), d weight = X^T dY
        out += [Gemm(phase, M, n, k, s.n_layer, "m") for k, n in linears]
        out += [Gemm(phase, k, M, n, s.n_layer, "k") for k, n in linears]
    return out


def head(M: int, s: Setting, phase: str, backward: bool = False) -> list[Gemm]:
    """The tied LM head on M positions (and its two backward products)."""
    out = [Gemm(phase, M, s.n_embd, s.vocab, 1, "m")]
    if backward:
        out += [Gemm(phase, M, s.vocab, s.n_embd, 1, "m"), Gemm(phase, s.vocab, M, s.n_embd, 1, "k")]
    return out


def iteration_gemms(algo: str, s: Setting, epochs: int) -> list[Gemm]:
    """Every GEMM of one iteration of `algo` ('ppo', 'grpo' or 'rloo', each with a reference forward for its KL
    term; PPO also with a separate value model) in setting `s` with `epochs` update passes."""
    B, P, T = s.batch, s.prompt_len, s.response_len
    L = P + T
    gen = trunk(B * P, s, "generate") + head(B, s, "generate")  # prefill: the LM head on the last position only
    gen += [g._replace(times=g.times * (T - 1), split="") for g in trunk(B, s, "generate") + head(B, s, "generate")]
    score = trunk(B * L, s, "score") + head(B * T, s, "score")  # reference log-probs
    score += trunk(B * L, s, "score")  # reward model (its 1-logit head is negligible)
    update = trunk(B * L, s, "update", backward=True) + head(B * T, s, "update", backward=True)
    if algo == "ppo":  # the value model: its rollout values, then its forward and backward in every epoch
        score += trunk(B * L, s, "score")
        update += trunk(B * L, s, "update", backward=True)
    elif algo not in ("grpo", "rloo"):
        raise ValueError(f"algo must be 'ppo', 'grpo' or 'rloo', got {algo!r}")
    return gen + score + [g._replace(times=g.times * epochs) for g in update]


def flops(g: Gemm) -> int:
    return 2 * g.m * g.k * g.n * g.times


def gemm_seconds(m: int, k: int, n: int, repeats: int = 7, min_time: float = 0.05) -> float:
    """Best time of one (m, k) @ (k, n) product over `repeats` timed loops of at least `min_time` s each."""
    x, w = torch.randn(m, k), torch.randn(k, n)
    for _ in range(3):
        torch.mm(x, w)
    best = float("inf")
    for _ in range(repeats):
        loops, start = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - start) < min_time or loops < 3:
            torch.mm(x, w)
            loops += 1
        best = min(best, elapsed / loops)
    return best


def best_seconds(m: int, k: int, n: int, split: str) -> float:
    """The fastest way to do the product in chunks: its token dimension `split` in 1, 2, 4 or 8 equal parts of at
    least 64, each part timed (a trainer may chunk its batch as it likes; adding up k-chunks is not counted)."""
    tokens = {"m": m, "k": k}.get(split, 0)
    best = gemm_seconds(m, k, n)
    for parts in (2, 4, 8):
        if tokens % parts or tokens // parts < 64:
            continue
        shape = (tokens // parts, k, n) if split == "m" else (m, tokens // parts, n)
        best = min(best, parts * gemm_seconds(*shape))
    return best


def floor_seconds(gemms: list[Gemm], cache: dict | None = None) -> dict[str, float]:
    """Seconds per phase (and 'total'): each GEMM's count times its best measured time at its shape (a shape is
    timed once per `cache`)."""
    cache = {} if cache is None else cache
    out: dict[str, float] = {}
    for g in gemms:
        shape = (g.m, g.k, g.n, g.split)
        if shape not in cache:
            cache[shape] = best_seconds(*shape)
        out[g.phase] = out.get(g.phase, 0.0) + g.times * cache[shape]
    out["total"] = sum(out.values())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--algos", nargs="+", default=["ppo", "grpo", "rloo"], choices=["ppo", "grpo", "rloo"])
    parser.add_argument("--epochs", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--arch", choices=["gpt2", "llama"], default="gpt2", help="the small preset's architecture")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from textenv.embedded import default_tokenizer
    from textenv.models import preset_config

    s, cache, results = Setting.of(preset_config("small", default_tokenizer(), args.arch)), {}, []
    for algo in args.algos:
        for epochs in args.epochs:
            gemms = iteration_gemms(algo, s, epochs)
            sec = floor_seconds(gemms, cache)
            gflop = sum(map(flops, gemms)) / 1e9
            results.append({"algo": algo, "epochs": epochs, "gflop": gflop, "floor_s": sec})
            print(f"{algo} epochs={epochs}: {gflop:.1f} GFLOP in GEMMs, floor {sec['total']:.3f} s/iter "
                  f"(generate {sec['generate']:.3f}, score {sec['score']:.3f}, update {sec['update']:.3f}); "
                  f"{gflop / sec['total']:.0f} GFLOP/s", flush=True)
    print(json.dumps({"bench": "gemm_floor", "threads": args.threads, "setting": vars(s), "results": results}))


if __name__ == "__main__":
    main()
