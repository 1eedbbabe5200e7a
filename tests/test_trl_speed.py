"""The arithmetic benchmarks/trl_speed.py prints beside its timings, against hand-computed values."""

import pytest

from benchmarks.trl_speed import extra_epochs, extra_epochs_line, medians_of, summary_line


def test_extra_epochs_by_hand():
    one = {"epochs": 1, "ours": 1.0, "trl": 2.0, "floor": 0.5}
    four = {"epochs": 4, "ours": 2.5, "trl": 3.5, "floor": 1.1}
    split = extra_epochs(one, four)
    assert split["ours"] == pytest.approx(0.5)  # (2.5 - 1.0) / 3
    assert split["trl"] == pytest.approx(0.5)
    assert split["floor"] == pytest.approx(0.2)
    assert split["speedup"] == pytest.approx(1.0)
    assert split["floor_share"] == pytest.approx(0.4)
    assert split["bound"] == pytest.approx(3.5 / (1.0 + 3 * 0.2))  # 2.1875
    line = extra_epochs_line("ppo", split)
    assert "(x1.00)" in line and "40% of floor speed" in line and "at most x2.19" in line


def test_extra_epochs_needs_a_one_epoch_setting():
    with pytest.raises(ValueError, match="got 2 and 4"):
        extra_epochs({"epochs": 2, "ours": 1, "trl": 1, "floor": 1}, {"epochs": 4, "ours": 2, "trl": 2, "floor": 2})


def test_medians_and_summary_line():
    result = {"epochs": 4, "gemm_floor_s": [1.0, 1.2, 1.1],
              "textenv": [{"sec_per_iter_median": s} for s in (2.4, 2.6, 2.5)],
              "trl": [{"sec_per_iter_median": s} for s in (3.4, 3.5, 3.9)]}
    assert medians_of(result) == {"epochs": 4, "ours": 2.5, "trl": 3.5, "floor": 1.1}
    runs = lambda secs, **k: [{"sec_per_iter_median": s, "rollout_tokens_per_s": 1000.0, "peak_rss_mib": 900.0,  # noqa: E731
                               **k} for s in secs]
    line = summary_line("ppo", 4, result["gemm_floor_s"], runs((2.4, 2.6, 2.5)),
                        runs((3.4, 3.5, 3.9), trl_version="1.12.0"))
    assert "x1.40" in line  # 3.5 / 2.5
    assert "44% of floor speed" in line  # 1.1 / 2.5
    assert "most equal FLOPs allow x3.18" in line  # 3.5 / 1.1
    assert "x2 needs 63% of floor speed" in line  # 2 * 1.1 / 3.5
