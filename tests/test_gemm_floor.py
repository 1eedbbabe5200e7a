"""The GEMM count behind benchmarks/gemm_floor.py, against FLOPs computed by hand."""

import pytest

from benchmarks.gemm_floor import Setting, flops, iteration_gemms

# one block of width 2 (linears 2x6, 2x2, 2x8, 8x2: 2 * 48 = 96 FLOPs a token), vocab 3 (2 * 2 * 3 = 12 a
# position), one row, a 1-token prompt and 2-token responses (3 tokens a row)
TINY = Setting(n_layer=1, n_embd=2, n_head=1, vocab=3, batch=1, prompt_len=1, response_len=2)


def total(algo, epochs):
    return sum(map(flops, iteration_gemms(algo, TINY, epochs)))


def test_flops_by_hand():
    generate = 2 * (96 + 12)  # prefill (trunk + the LM head on the last position), then 1 more step
    score = (3 * 96 + 2 * 12) + 3 * 96  # reference (LM head on the 2 response positions), reward model
    update = 3 * (3 * 96 + 2 * 12)  # forward, d input, d weight: three equal products per linear
    assert total("grpo", 1) == total("rloo", 1) == generate + score + update == 1752
    assert total("grpo", 2) == generate + score + 2 * update
    value = 3 * 96 + 3 * (3 * 96)  # PPO's value model: its rollout forward, then forward + backward per epoch
    assert total("ppo", 1) == 1752 + value == 2904


def test_anchor_forward_flops_per_token():
    # the anchor's 4.27M-parameter GPT-2 does about 8.6 MFLOP a token forward; its GEMMs are 2 * (12 E^2 L + E V)
    s = Setting()
    one_step = [g for g in iteration_gemms("grpo", s, 1) if g.phase == "generate" and g.m == s.batch and g.times > 1]
    assert sum(map(flops, one_step)) / (s.batch * (s.response_len - 1)) == 2 * (12 * 256**2 * 4 + 256 * 4096)


def test_unknown_algo():
    with pytest.raises(ValueError, match="'dpo'"):
        iteration_gemms("dpo", TINY, 1)


def test_where_time_goes_splits_each_piece_into_gemms_and_the_rest(monkeypatch, capsys):
    """benchmarks/where_time_goes.py on short responses: every piece is timed, its profiled multiplies are found
    (a renamed op would read 0 here), its floor is below its wall time, and `--top` lists its costliest other ops."""
    import json
    import sys

    from benchmarks import gemm_floor, where_time_goes

    quick = gemm_floor.gemm_seconds
    monkeypatch.setattr(gemm_floor, "gemm_seconds", lambda m, k, n: quick(m, k, n, repeats=1, min_time=0.001))
    monkeypatch.setattr(sys, "argv", ["where_time_goes", "--response-len", "4", "--batch", "4", "--repeats", "1",
                                      "--top", "3"])
    where_time_goes.main()
    pieces = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["pieces"]
    assert [p["piece"] for p in pieces] == ["decode", "reference log-probs", "reward scores",
                                            "policy forward+backward", "value forward+backward"]
    for p in pieces:
        assert p["gemm_s"] > 0 and p["other_s"] > 0 and 0 < p["floor_s"] < p["wall_s"], p
        ops, seconds = zip(*p["top_other"])
        assert len(ops) == 3 and not set(ops) & set(where_time_goes.GEMM_OPS), p["top_other"]
        assert list(seconds) == sorted(seconds, reverse=True) and sum(seconds) <= p["other_s"] + 1e-9, p
