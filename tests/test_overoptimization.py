"""benchmarks/overoptimization.py: where gold turns down, its fits, the truncated proxies, and one tiny run end to
end (two proxy sizes, best-of-n and PPO against each, the tables and figures)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from transformers import AutoModelForCausalLM

from benchmarks import overoptimization as oo
from benchmarks.algorithms import gao_curve

# two proxy sizes on the tiny run's 32 prompts of comparisons; a learning rate that moves a tiny policy in 4 steps
TINY = ["--depths", "1", "2", "--data-sizes", "32", "--bon-prompts", "4", "--bon-samples", "8", "--iterations", "4",
        "--num-envs", "8", "--smooth", "2", "--lr", "3e-3", "--value-warmup", "1", "--seeds", "2"]


def curve(d, gold):
    return [{"kl": float(x) ** 2, "gold": float(g)} for x, g in zip(d, gold)]


def test_turn_finds_a_peak_inside_the_range_and_not_a_rise():
    d = np.linspace(0.1, 3, 12)
    peaked = curve(d, gao_curve(d, 1.0, 0.4, "bon"))  # peak at a / 2b = 1.25
    rising = curve(d, gao_curve(d, 1.0, 0.1, "bon"))  # peak at 5, past the range
    t = oo.turn(peaked, window=1)
    assert t["turns_down"] and t["peak_kl"] == pytest.approx(d[4] ** 2)  # the grid point nearest 1.25
    assert not oo.turn(rising, window=1)["turns_down"]
    f = oo.fit(peaked, base=0.0, form="bon")
    assert f["a"] == pytest.approx(1.0) and f["b"] == pytest.approx(0.4) and f["peak_d"] == pytest.approx(1.25)
    assert f["peak_inside"] and not oo.fit(rising, 0.0, "bon")["peak_inside"]
    # RL: a noisy decline after the peak counts only beyond twice the end window's standard error
    flat = curve(d, [0, 0.5, 0.8, 0.9, 0.9, 0.91, 0.89, 0.9, 0.9, 0.92, 0.88, 0.9])
    assert not oo.turn(flat, window=3)["turns_down"]
    falling = curve(d, [0, 0.5, 0.8, 0.9, 0.9, 0.85, 0.7, 0.6, 0.5, 0.41, 0.4, 0.42])
    assert oo.turn(falling, window=3)["turns_down"]


def test_n_grid_two_per_octave():
    assert oo.n_grid(16) == [1, 2, 3, 4, 6, 8, 11, 16]
    assert oo.n_grid(12)[-1] == 12


def test_truncated_init_keeps_the_first_blocks(tiny_run, tmp_path):
    sft = tiny_run / "sft" / "model"
    one = AutoModelForCausalLM.from_pretrained(oo.truncated_init(sft, 1, tmp_path / "one"))
    full = AutoModelForCausalLM.from_pretrained(sft)
    assert one.config.n_layer == 1 and len(one.transformer.h) == 1
    kept = {k: v for k, v in full.state_dict().items() if ".h.1." not in k}
    assert all((one.state_dict()[k] == v).all() for k, v in kept.items())
    with pytest.raises(ValueError, match="--depths: 3"):
        oo.truncated_init(sft, 3, tmp_path / "three")


def test_a_tiny_run_end_to_end(tiny_run, tmp_path):
    out = tmp_path / "bench"
    oo.main(TINY + ["--run", str(tiny_run), "--out-dir", str(out)])
    result = json.loads((out / "results.json").read_text())
    assert [p["name"] for p in result["proxies"]] == ["rm-1blocks-32", "rm-2blocks-32"]
    one, two = result["proxies"]
    assert 0 < one["params"] < two["params"]
    for p in result["proxies"]:
        assert [r["n"] for r in p["bon"]["curve"]] == [1, 2, 3, 4, 6, 8]
        assert [r["iteration"] for r in p["rl"]["curve"]] == [1, 2, 3, 4]
        assert p["rl"]["curve"][1]["kl"] < 1e-4  # iteration 2 still samples the SFT policy: 1 value-only iteration
        # two PPO runs per proxy, in their own folders; the RL curve is their mean at each iteration
        first, second = (run["curve"] for run in p["rl"]["seeds"])
        assert [run["seed"] for run in p["rl"]["seeds"]] == [0, 1]
        assert (out / f"ppo-{p['name']}-seed1" / "metrics.jsonl").exists()
        assert [r["gold"] for r in first] != [r["gold"] for r in second]  # other prompts and samples
        for key in ("kl", "gold", "proxy"):
            assert [r[key] for r in p["rl"]["curve"]] == pytest.approx([(x[key] + y[key]) / 2
                                                                        for x, y in zip(first, second)])
        assert all(set(run["fit"]) == {"a", "b", "r2", "peak_d", "peak_inside"} for run in p["rl"]["seeds"])
        assert p["bon"]["curve"][0]["gold"] == pytest.approx(result["base_gold"])  # best-of-1 is the SFT mean
        for method in ("bon", "rl"):
            assert set(p[method]["fit"]) == {"a", "b", "r2", "peak_d", "peak_inside"}
    assert (out / "fig1_gold_vs_kl.png").stat().st_size > 0 and (out / "fig3_coefficients.png").stat().st_size > 0
    assert "rm-2blocks-32" in (out / "results.md").read_text()
    assert "PPO per seed" in (out / "results.md").read_text()
    # a rerun reuses every trained proxy, PPO run and the best-of-n samples
    before = (out / "bon_samples.npz").read_bytes()
    oo.main(TINY + ["--run", str(tiny_run), "--out-dir", str(out)])
    assert (out / "bon_samples.npz").read_bytes() == before
    assert json.loads((out / "results.json").read_text())["proxies"] == result["proxies"]


def test_a_value_warmup_as_long_as_the_run_is_refused_by_name(capsys):
    with pytest.raises(SystemExit):
        oo.main(["--iterations", "8", "--value-warmup", "8"])
    assert "--value-warmup 8 must be between 0 and --iterations 8 - 1" in capsys.readouterr().err


def test_seed_mean_averages_each_iteration():
    one = [{"iteration": 1, "kl": 0.0, "gold": 0.1, "proxy": 0.0},
           {"iteration": 2, "kl": 4.0, "gold": 0.5, "proxy": 1.0}]
    two = [{"iteration": 1, "kl": 0.0, "gold": 0.3, "proxy": 0.2},
           {"iteration": 2, "kl": 9.0, "gold": 0.1, "proxy": 3.0}]
    assert oo.seed_mean([one, two]) == [{"iteration": 1, "kl": 0.0, "gold": pytest.approx(0.2), "proxy": 0.1},
                                        {"iteration": 2, "kl": 6.5, "gold": pytest.approx(0.3), "proxy": 2.0}]
    with pytest.raises(ValueError, match="different lengths"):
        oo.seed_mean([one, two[:1]])


def test_the_budget_adds_seeds_above_30_minutes_and_shortens_runs_below():
    default, long, short = oo.parse_args([]), oo.parse_args(["--budget", "90"]), oo.parse_args(["--budget", "10"])
    assert (default.seeds, default.iterations, default.bon_prompts) == (1, 72, 32)
    assert (long.seeds, long.iterations, long.bon_prompts) == (3, 72, 96)
    assert (short.seeds, short.iterations, short.bon_prompts) == (1, 24, 11)
    assert oo.parse_args(["--budget", "90", "--seeds", "2", "--iterations", "30"]).seeds == 2


@pytest.mark.parametrize("argv, message", [(["--seeds", "0"], "--seeds 0 must be at least 1"),
                                           (["--budget", "-5"], "--budget -5 must be a positive")])
def test_bad_seeds_and_budget_are_refused_by_name(argv, message, capsys):
    with pytest.raises(SystemExit):
        oo.parse_args(argv)
    assert message in capsys.readouterr().err


def test_a_curve_that_barely_moved_gets_no_fit():
    f = oo.fit(curve([0.0, 0.0, 0.5, 0.7], [0.1, 0.1, 0.2, 0.3]), base=0.1, form="rl")
    assert np.isnan(f["a"]) and not f["peak_inside"]
