"""Where an RL iteration's time goes, beside its GEMM floor: the pieces of the anchor setting (benchmarks/trl_speed.py),
each timed alone, its matrix multiplies split from everything else by torch.profiler.

Pieces: the rollout's decode (prefill and T - 1 steps of 32 rows), the reference's log-probs and the reward model's
scores (frozen, packed weights), and the update's forward and backward of the policy (log-probs at T positions)
and of PPO's value model. For each: the median wall time, the profiler's self time in matrix multiplies (oneDNN's
linear, `mm`, `addmm`; attention's batched products are counted with the rest) and in everything else, and the
floor of its GEMMs (benchmarks/gemm_floor.py: `torch.mm` at each shape on hot weights). The profiler's per-op
overhead inflates the "other" column a little; the wall time is measured without it.

    python -m benchmarks.where_time_goes                      # Llama preset, 48-token responses
    python -m benchmarks.where_time_goes --arch gpt2 --response-len 192
    python -m benchmarks.where_time_goes --response-len 192 --top 8      # and each piece's 8 costliest other ops
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

GEMM_OPS = ("mkldnn::_linear_pointwise", "aten::mm", "aten::addmm")


def timed(fn, repeats: int) -> float:
    """Median seconds of `fn()` over `repeats` runs, after two unmeasured ones."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def gemm_share(fn, top: int = 0) -> tuple[float, float, list[tuple[str, float]]]:
    """(seconds in matrix multiplies, seconds in everything else, the `top` other ops by self seconds) of one
    `fn()`, by the profiler's self times."""
    from torch.profiler import profile

    with profile() as prof:
        fn()
    events = prof.key_averages()
    gemm = sum(e.self_cpu_time_total for e in events if e.key in GEMM_OPS) / 1e6
    others = sorted(((e.key, e.self_cpu_time_total / 1e6) for e in events if e.key not in GEMM_OPS),
                    key=lambda kv: -kv[1])
    return gemm, sum(e.self_cpu_time_total for e in events) / 1e6 - gemm, others[:top]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", choices=["gpt2", "llama"], default="llama")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--response-len", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--top", type=int, default=0, help="also list each piece's N costliest non-GEMM ops")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForSequenceClassification

    from agents.policy import policy_forward, value_forward
    from benchmarks.gemm_floor import Setting, floor_seconds, head, trunk
    from textenv.embedded import default_tokenizer
    from textenv.models import build_model, keep_freed_memory, preset_config
    from textenv.models.decoding import make_decoder
    from textenv.models.lean import frozen_forward

    keep_freed_memory()  # as the `textenv` command and the benchmarks run
    B, P, T = args.batch, args.prompt_len, args.response_len
    tok = default_tokenizer()
    policy = build_model("small", tok, seed=0, arch=args.arch)
    config = preset_config("small", tok, args.arch)
    config.num_labels = 1
    torch.manual_seed(1)
    value_model = AutoModelForSequenceClassification.from_config(config)
    reward_model = AutoModelForSequenceClassification.from_config(config).eval().requires_grad_(False)
    ids = torch.randint(5, len(tok), (B, P + T), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    s = Setting.of(config, batch=B, prompt_len=P, response_len=T)
    L = P + T

    @torch.inference_mode()
    def decode():
        decoder = make_decoder(policy, B, L)
        decoder.prefill(ids[:, :P], mask[:, :P])
        for t in range(T - 1):
            decoder.step(ids[:, P + t])

    ref = frozen_forward(policy, pack_rows=B * L)
    rm = frozen_forward(reward_model, pack_rows=B * L)

    @torch.no_grad()
    def reference():
        policy_forward(ref, ids, mask, P, 1.0, entropy=False)

    @torch.no_grad()
    def reward():
        rm.scores(ids, mask)

    def policy_update():
        logp, _, _ = policy_forward(policy, ids, mask, P, 1.0)
        logp.sum().backward()

    def value_update():
        value_forward(value_model, ids, mask, P).sum().backward()

    gen = trunk(B * P, s, "x") + head(B, s, "x")
    gen += [g._replace(times=g.times * (T - 1), split="") for g in trunk(B, s, "x") + head(B, s, "x")]
    pieces = {  # name -> (function, its GEMMs for the floor)
        "decode": (decode, gen),
        "reference log-probs": (reference, trunk(B * L, s, "x") + head(B * T, s, "x")),
        "reward scores": (reward, trunk(B * L, s, "x")),
        "policy forward+backward": (policy_update, trunk(B * L, s, "x", True) + head(B * T, s, "x", True)),
        "value forward+backward": (value_update, trunk(B * L, s, "x", True)),
    }
    print(f"{args.arch} small preset, batch {B}, prompt {P}, response {T}, {args.threads} threads; "
          "ms: wall (median), profiler self time in GEMMs / other, GEMM floor", flush=True)
    rows, cache = [], {}
    for name, (fn, gemms) in pieces.items():
        wall = timed(fn, args.repeats)
        gemm, other, top = gemm_share(fn, args.top)
        floor = floor_seconds(gemms, cache)["total"]
        rows.append({"piece": name, "wall_s": wall, "gemm_s": gemm, "other_s": other, "floor_s": floor,
                     "top_other": top})
        print(f"{name:>24}: {wall * 1e3:7.1f} ms | GEMMs {gemm * 1e3:6.1f}, other {other * 1e3:6.1f} "
              f"({other / (gemm + other):.0%}) | floor {floor * 1e3:6.1f} ({floor / wall:.0%} of wall)", flush=True)
        for op, seconds in top:
            print(f"{'':>26}{op}: {seconds * 1e3:.1f} ms")
    print(json.dumps({"bench": "where_time_goes", "args": vars(args), "pieces": rows}))


if __name__ == "__main__":
    main()
