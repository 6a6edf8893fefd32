"""Training curves: the trailing moving average and the reward plot with its per-step spread."""

from __future__ import annotations

from pathlib import Path

import pytest

from memtrain.io import append_jsonl
from memtrain.rl.metrics import METRICS_FILE, moving_average, plot_run


def test_moving_average_is_trailing_and_starts_at_the_first_step() -> None:
    assert moving_average([1.0, 2.0, 3.0, 4.0, 5.0], 2) == [1.0, 1.5, 2.5, 3.5, 4.5]
    assert moving_average([0.0, 0.0, 3.0], 5) == [0.0, 0.0, 1.0]  # shorter windows at the start
    assert moving_average([2.0, 4.0], 1) == [2.0, 4.0]
    assert moving_average([], 3) == []
    with pytest.raises(ValueError, match="window=0"):
        moving_average([1.0], 0)


def test_reward_plot_draws_the_spread_and_the_smoothed_curve(tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    import matplotlib.axes

    rows = [{"step": s, "e2e_reward": 0.1 * s, "e2e_reward_std": 0.05, "imr_match": 0.0}
            for s in range(1, 13)]
    rows[3].pop("e2e_reward_std")  # one row without the spread (a run resumed from an older version)
    append_jsonl(tmp_path / METRICS_FILE, rows)
    bands, lines = [], []
    axes = matplotlib.axes.Axes
    fill, plot = axes.fill_between, axes.plot
    monkeypatch.setattr(axes, "fill_between", lambda ax, *a, **k: bands.append(a) or fill(ax, *a, **k))
    monkeypatch.setattr(axes, "plot", lambda ax, *a, **k: lines.append(k.get("label")) or plot(ax, *a, **k))
    paths = plot_run(tmp_path)
    assert [p.name for p in paths] == ["rewards.png"]
    assert bands == []  # a series with a row lacking the spread gets no band
    assert lines.count("moving average (5 steps)") == 2  # both reward series have 12 >= 10 points

    rows[3]["e2e_reward_std"] = 0.05
    (tmp_path / METRICS_FILE).unlink()
    append_jsonl(tmp_path / METRICS_FILE, rows)
    plot_run(tmp_path)
    steps, low, high = bands[0]
    assert list(steps) == list(range(1, 13))
    assert low[0] == pytest.approx(0.05) and high[-1] == pytest.approx(1.25)
