"""What a training run records: ``metrics.jsonl`` (one row per step), TensorBoard events, readable sample
trajectories, validations (``eval/step_N``, with ``train.eval_data``), a summary table, and PNG curves
(``memtrain plot``).

``metrics.jsonl`` is the source of truth: plain JSON (non-finite numbers are written as null), appended and
flushed once per step. On resume, rows after the checkpoint's step are dropped (they belong to steps that are
about to be redone) and TensorBoard is told to purge them too, so every step appears exactly once. Dropped
rows are never lost: they are appended to ``metrics.dropped.jsonl`` (``samples.dropped.jsonl``) first.
"""

from __future__ import annotations

import json
import math
import re
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from memtrain.errors import UserError
from memtrain.eval.report import SUMMARY, load_summary
from memtrain.io import append_jsonl, atomic_write_text, read_jsonl, read_jsonl_tail
from memtrain.log import logger

METRICS_FILE = "metrics.jsonl"
SAMPLES_FILE = "samples.jsonl"
TENSORBOARD_DIR = "tensorboard"
WANDB_ID_FILE = "wandb_id"  # the W&B run id, so a resumed training run continues the same W&B run
PLOTS_DIR = "plots"
EVAL_DIR = "eval"  # validations: eval/step_N (an eval run directory), eval/dropped/ (moved aside on resume)
_STEP_DIR = re.compile(r"step_(\d+)")

# Columns every metrics row carries (None where a task does not produce them, e.g. imr_match without IMR).
REQUIRED_COLUMNS: tuple[str, ...] = (
    "step",
    "e2e_reward",
    "e2e_match",
    "imr_match",
    "kl",
    "loss",
    "clip_frac",
    "entropy",
    "filtered_groups",
    "memory_cap_hits",
    "tokens_generated",
    "time_rollout_s",
    "time_update_s",
    "step_time_s",
)

# (file stem, title, [(column, label)]) of the PNGs ``plot_run`` writes; absent columns are left out.
PLOTS: tuple[tuple[str, str, tuple[tuple[str, str], ...]], ...] = (
    (
        "rewards",
        "Rewards",
        (
            ("e2e_reward", "E2E reward (match + IMR bonus)"),
            ("e2e_match", "E2E match"),
            ("imr_match", "IMR match"),
            ("search_reward", "search reward"),
        ),
    ),
    (
        "kl",
        "Policy update",
        (
            ("kl", "KL to reference (k3)"),
            ("loss", "loss"),
            ("clip_frac", "clip fraction"),
            ("entropy", "entropy of the trained tokens (nats/token)"),
            ("sample_entropy", "entropy estimate of all sampled tokens (nats/token)"),
            ("grad_norm", "grad norm"),
        ),
    ),
    (
        "lengths",
        "Lengths",
        (
            ("len_memory", "memory turn tokens"),
            ("len_final", "answer tokens"),
            ("len_imr", "IMR answer tokens"),
            ("memory_cap_rate", "memory cap hit rate"),
            ("answer_cap_rate", "answer cap hit rate"),
            ("kept_groups", "groups kept (learned from)"),
            ("filtered_groups", "filtered groups"),
        ),
    ),
    (
        "timings",
        "Time per step (s)",
        (("time_rollout_s", "rollout"), ("time_update_s", "update"), ("step_time_s", "whole step")),
    ),
)


COLLAPSE_FLAGS = {
    "warn_no_signal": "steps in a row kept no group (every group's rewards were equal): nothing was learned",
    "warn_memory_cap": "every memory hit the memory cap (agent.memory_tokens)",
    "warn_answer_cap": "every answer hit the answer cap (agent.answer_tokens)",
}


def collapse_flags(history: Sequence[Mapping[str, Any]], patience: int) -> dict[str, float]:
    """The warnings a step's row carries (1.0 = raised; see ``COLLAPSE_FLAGS``), from the rows up to and
    including it: ``patience`` steps in a row without a kept group, or a cap hit by every memory / answer
    turn of the step. A run that collapses (memories padded to the cap, answers that ramble to it, no group
    with a reward difference) shows it in the row, the log and ``memtrain plot --table``."""
    if not history:
        return {}
    row = history[-1]
    recent = history[-patience:]
    flags = {
        "warn_no_signal": len(recent) == patience and all(r.get("kept_groups") == 0 for r in recent),
        "warn_memory_cap": row.get("memory_cap_rate") == 1.0,
        "warn_answer_cap": row.get("answer_cap_rate") == 1.0,
    }
    return {k: 1.0 for k, raised in flags.items() if raised}


def clean_value(value: Any) -> Any:
    """JSON-safe scalar: non-finite floats become None (JSON has no NaN); numpy/torch scalars -> float."""
    if isinstance(value, bool) or value is None or isinstance(value, (str, int)):
        return value
    try:
        f = float(value)
    except (TypeError, ValueError):
        return value
    return f if math.isfinite(f) else None


def dropped_path(path: Path) -> Path:
    """Where rows removed from ``path`` on resume are kept (metrics.jsonl -> metrics.dropped.jsonl)."""
    path = Path(path)
    return path.with_name(f"{path.stem}.dropped{path.suffix}")


def truncate_after(path: Path, step: int) -> int:
    """Keep only rows with ``row['step'] <= step`` (atomic rewrite); returns how many rows were dropped.

    The dropped rows are appended to :func:`dropped_path` before the rewrite, so history is moved, never
    erased (a resume from an older checkpoint than expected stays recoverable). A half-written last line (a
    killed writer, a damaged file) is moved there too, as ``damaged_text``, so the next append starts on a
    fresh line.
    """
    path = Path(path)
    if not path.is_file():
        return 0
    text = path.read_text(encoding="utf-8")
    rows, damaged = read_jsonl_tail(path)
    kept = [r for r in rows if int(r.get("step", 0)) <= step]
    dropped = [r for r in rows if int(r.get("step", 0)) > step]
    if damaged is not None:  # a half-written last row: its text is kept, never silently lost
        dropped.append({"damaged_text": damaged})
        logger.warning("%s: its last line is not a complete JSON row (a killed writer or a damaged file); "
                       "its text is moved to %s (a step after %d is redone and logged again; the row of an "
                       "earlier one stays missing here)", path, dropped_path(path).name, step)
    if dropped:
        append_jsonl(dropped_path(path), [{**r, "dropped_on_resume_from_step": step} for r in dropped])
        logger.warning("%s: moved %d row(s) after step %d (redone now) to %s", path, len(dropped), step,
                       dropped_path(path).name)
    if len(kept) != len(rows) or damaged is not None or (text and not text.endswith("\n")):
        atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept))
    return len(dropped)


def _numbers(values: Mapping[str, Any], prefix: str) -> dict[str, float]:
    return {f"{prefix}{k}": v for k, v in values.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}


def start_wandb(run_dir: Path, project: str, mode: str, config: Mapping[str, Any]) -> Any:
    """A W&B run in ``RUN_DIR/wandb``; its id is kept in ``RUN_DIR/wandb_id`` so a resumed training run
    continues the same W&B run (steps it redoes after a kill keep their first values there)."""
    try:
        import wandb
    except ImportError:
        raise UserError("train.wandb=true: the wandb package is not installed; pip install -e '.[wandb]' "
                        "(or set train.wandb=false)") from None
    id_file = Path(run_dir) / WANDB_ID_FILE
    run_id = id_file.read_text(encoding="utf-8").strip() if id_file.is_file() else uuid.uuid4().hex[:8]
    atomic_write_text(id_file, run_id + "\n")
    return wandb.init(project=project, mode=mode, dir=str(run_dir), id=run_id, resume="allow",
                      name=Path(run_dir).name, config=dict(config))


class RunLogger:
    """Appends metrics rows and sample trajectories and mirrors numeric metrics to TensorBoard and, when
    asked for, Weights & Biases (``wandb``: a run from :func:`start_wandb`)."""

    def __init__(self, run_dir: Path, start_step: int, tensorboard: bool = True, wandb: Any = None) -> None:
        self.run_dir = Path(run_dir)
        self.metrics_path = self.run_dir / METRICS_FILE
        self.samples_path = self.run_dir / SAMPLES_FILE
        truncate_after(self.metrics_path, start_step)
        truncate_after(self.samples_path, start_step)
        self._tb = None
        self._wandb = wandb
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step drops events of steps > start_step left by a killed run: they are redone now
            self._tb = SummaryWriter(str(self.run_dir / TENSORBOARD_DIR), purge_step=start_step + 1)

    def _scalars(self, values: dict[str, float], step: int) -> None:
        if self._tb is not None:
            for key, value in values.items():
                self._tb.add_scalar(key, value, step)
            self._tb.flush()
        if self._wandb is not None and values:
            self._wandb.log(values, step=step)

    def log_step(self, row: dict[str, Any]) -> dict[str, Any]:
        """Write one step's row (required columns filled with None when absent); returns the cleaned row."""
        clean = {k: clean_value(v) for k, v in row.items()}
        for key in REQUIRED_COLUMNS:
            clean.setdefault(key, None)
        append_jsonl(self.metrics_path, [clean])
        self._scalars(_numbers({k: v for k, v in clean.items() if k != "step"}, "train/"), int(clean["step"]))
        return clean

    def log_samples(self, step: int, records: Sequence[dict[str, Any]]) -> None:
        append_jsonl(self.samples_path, [{"step": step, **r} for r in records])

    def log_validation(self, step: int, summary: Mapping[str, Any]) -> None:
        """``val/PART_METRIC`` scalars of a validation (its run directory is the record)."""
        values: dict[str, float] = {}
        for part, group in summary.get("groups", {}).items():
            values.update(_numbers((group or {}).get("metrics") or {}, f"val/{part}_"))
        self._scalars(values, step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: {run_dir} is not a training run directory (or has no finished step yet)"
        )
    return read_jsonl(path)


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) >= 1e-3 or value == 0 else f"{value:.2e}"
    return str(value)


def summary_table(
    rows: Sequence[dict[str, Any]],
    columns: Sequence[str] = (
        "step",
        "e2e_reward",
        "e2e_match",
        "imr_match",
        "kl",
        "loss",
        "kept_groups",
        "groups",
        "rollout_rounds",
        "memory_cap_rate",
        "answer_cap_rate",
        "len_final",
        "len_imr",
        "sample_entropy",
        "step_time_s",
        *COLLAPSE_FLAGS,
    ),
) -> str:
    """A fixed-width text table of some columns per step (columns no row has are left out)."""
    cols = [c for c in columns if any(r.get(c) is not None for r in rows)]
    cells = [[_fmt(r.get(c)) for c in cols] for r in rows]
    widths = [max([len(c), *(len(row[i]) for row in cells)]) for i, c in enumerate(cols)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(cols, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.rjust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)


SMOOTHING = 5  # steps in the moving average drawn over curves that have at least twice as many points


def moving_average(values: Sequence[float], window: int) -> list[float]:
    """Trailing mean of up to ``window`` values ending at each position (shorter at the start), so the
    curve starts at step 1 and never uses a later step."""
    if window < 1:
        raise ValueError(f"window={window}; expected >= 1")
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot_run(run_dir: Path, out_dir: Path | None = None) -> list[Path]:
    """Write one PNG per entry of PLOTS (rewards, KL/loss, lengths, timings) from metrics.jsonl."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(run_dir)
    if not rows:
        raise UserError(f"{Path(run_dir) / METRICS_FILE} has no rows yet; nothing to plot")
    out = Path(out_dir) if out_dir is not None else Path(run_dir) / PLOTS_DIR
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for stem, title, series in PLOTS:
        present = [(c, label) for c, label in series if any(r.get(c) is not None for r in rows)]
        if not present:
            continue
        fig, axes = plt.subplots(len(present), 1, figsize=(7, 2.2 * len(present)), sharex=True, squeeze=False)
        for ax, (col, label) in zip(axes[:, 0], present, strict=True):
            pts = [r for r in rows if r.get(col) is not None]
            steps, values = [r["step"] for r in pts], [r[col] for r in pts]
            ax.plot(steps, values, marker="o" if len(pts) < 30 else None, ms=3, lw=0.8, label="per step")
            if all(r.get(f"{col}_std") is not None for r in pts):  # the spread over the step's rollouts
                std = [r[f"{col}_std"] for r in pts]
                ax.fill_between(steps, [v - d for v, d in zip(values, std, strict=True)],
                                [v + d for v, d in zip(values, std, strict=True)], alpha=0.15, label="± std")
            if len(pts) >= 2 * SMOOTHING:
                ax.plot(steps, moving_average(values, SMOOTHING), lw=2,
                        label=f"moving average ({SMOOTHING} steps)")
                ax.legend(fontsize=6, loc="upper left")
            ax.set_ylabel(label, fontsize=8)
            ax.grid(alpha=0.3)
        axes[-1, 0].set_xlabel("step")
        fig.suptitle(f"{title} - {Path(run_dir).name}")
        fig.tight_layout()
        path = out / f"{stem}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    validation = _plot_validation(plt, run_dir, rows, out)
    return written + ([validation] if validation is not None else [])


def _plot_validation(plt: Any, run_dir: Path, rows: Sequence[Mapping[str, Any]], out: Path) -> Path | None:
    """validation.png: the trained metric on the held-out set per validated step, with its 95% interval."""
    points = _validations(run_dir, rows)
    keys = list(dict.fromkeys(k for p in points.values() for k in p))
    if not keys:
        return None
    fig, axes = plt.subplots(len(keys), 1, figsize=(7, 2.2 * len(keys)), sharex=True, squeeze=False)
    for ax, key in zip(axes[:, 0], keys, strict=True):
        scale = 1 if key.endswith(WORDS) else 100
        steps = [step for step, p in points.items() if key in p]
        means = [scale * points[step][key]["mean"] for step in steps]
        has_ci = all(points[step][key]["lo"] is not None for step in steps)
        err = None
        if has_ci:
            err = [[m - scale * points[st][key]["lo"] for st, m in zip(steps, means, strict=True)],
                   [scale * points[st][key]["hi"] - m for st, m in zip(steps, means, strict=True)]]
        ax.errorbar(steps, means, yerr=err, marker="o", ms=4, lw=1, capsize=3,
                    label="mean, 95% bootstrap interval" if has_ci else "mean")
        ax.set_ylabel(key if scale == 1 else f"{key} (%)", fontsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, loc="upper left")
    axes[-1, 0].set_xlabel("step (0: before training)")
    fig.suptitle(f"Validation on the held-out set (greedy) - {Path(run_dir).name}")
    fig.tight_layout()
    path = out / "validation.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------------------------------------
# Validations (train.eval_data): RUN_DIR/eval/step_N, each an eval run directory with its summary.json
# --------------------------------------------------------------------------------------------------------


def validation_dirs(run_dir: Path) -> dict[int, Path]:
    """Step -> ``eval/step_N`` of every finished validation of a run (those with a summary), by step."""
    root = Path(run_dir) / EVAL_DIR
    found = {}
    for path in root.iterdir() if root.is_dir() else ():
        match = _STEP_DIR.fullmatch(path.name)
        if match and (path / SUMMARY).is_file():
            found[int(match.group(1))] = path
    return dict(sorted(found.items()))


def drop_validations_after(run_dir: Path, step: int) -> int:
    """Move validations of steps after ``step`` (a killed run's, about to be redone) to ``eval/dropped/``,
    as resume moves metrics rows: never erased, never mixed with the redone ones. Returns how many moved."""
    root = Path(run_dir) / EVAL_DIR
    moved = 0
    for path in sorted(root.iterdir()) if root.is_dir() else ():
        match = _STEP_DIR.fullmatch(path.name)
        if match and int(match.group(1)) > step:
            target = root / "dropped" / path.name
            n = 1
            while target.exists():
                n += 1
                target = root / "dropped" / f"{path.name}.{n}"
            target.parent.mkdir(parents=True, exist_ok=True)
            path.rename(target)
            moved += 1
    if moved:
        logger.warning("%s: moved %d validation(s) after step %d (redone now) to %s", root, moved, step,
                       root / "dropped")
    return moved


def validation_points(summary: Mapping[str, Any], metric: str) -> dict[str, dict[str, float | None]]:
    """``"PART METRIC"`` -> {mean, lo, hi} of one validation: ``metric`` of every part (group) of the
    evaluation, with its bootstrap interval where the evaluation gives one, and the rate at which the label
    was in the memory asked from (``PART label in memory``) where it measures that."""
    out: dict[str, dict[str, float | None]] = {}
    for part in summary.get("order") or list(summary.get("groups", {})):
        detail = summary.get(part) if isinstance(summary.get(part), Mapping) else {}
        ci = (detail.get("metrics") or {}).get(metric)
        mean = ((summary.get("groups", {}).get(part) or {}).get("metrics") or {}).get(metric)
        if isinstance(ci, Mapping):
            out[f"{part} {metric}"] = {"mean": ci["mean"], "lo": ci["lo"], "hi": ci["hi"]}
        elif mean is not None:
            out[f"{part} {metric}"] = {"mean": mean, "lo": None, "hi": None}
        kept = detail.get("in_memory")
        if isinstance(kept, Mapping):
            out[f"{part} label in memory"] = {"mean": kept["mean"], "lo": kept["lo"], "hi": kept["hi"]}
        words = detail.get("answer_words")
        if isinstance(words, Mapping):
            out[f"{part} {WORDS}"] = {"mean": words["mean"], "lo": words["lo"], "hi": words["hi"]}
    return out


WORDS = "answer words"  # the validation point that is a length, not a rate: shown as it is, not in %


def validation_line(summary: Mapping[str, Any], metric: str) -> str:
    """``imr f1 % 2.05 [0.69, 3.68], ...``: :func:`validation_points` for a log line."""
    points = validation_points(summary, metric)
    return ", ".join(f"{k}{'' if k.endswith(WORDS) else ' %'} {_cell(v, k)}" for k, v in points.items()) \
        or "no metrics"


def _cell(point: Mapping[str, float | None], key: str = "") -> str:
    """``mean [lo, hi]`` in % (answer words as they are), or ``mean`` without an interval."""
    fmt = _num if key.endswith(WORDS) else _pct
    ci = f" [{fmt(point['lo'])}, {fmt(point['hi'])}]" if point["lo"] is not None else ""
    return fmt(point["mean"]) + ci


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}"


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _trained_metric(rows: Sequence[Mapping[str, Any]], summaries: Sequence[Mapping[str, Any]]) -> str:
    """The run's reward metric (what it trains on), else the evaluation's main metric."""
    for row in reversed(rows):
        if row.get("reward_metric"):
            return str(row["reward_metric"])
    return str(summaries[0].get("main_metric", "em")) if summaries else "em"


def _validations(run_dir: Path, rows: Sequence[Mapping[str, Any]]) -> dict[int, dict[str, Any]]:
    """Step -> :func:`validation_points` of every finished validation, in the run's trained metric."""
    summaries = {step: load_summary(path) for step, path in validation_dirs(run_dir).items()}
    metric = _trained_metric(rows, list(summaries.values()))
    return {step: validation_points(s, metric) for step, s in summaries.items()}


def validation_table(run_dir: Path, rows: Sequence[Mapping[str, Any]] = ()) -> str:
    """Step x (trained metric per part, label in memory) of a run's validations, in % with 95% intervals;
    empty when the run has none."""
    points = _validations(run_dir, rows)
    if not points:
        return ""
    cols = list(dict.fromkeys(k for p in points.values() for k in p))
    heads = [f"{c} ({'' if c.endswith(WORDS) else '%, '}95% CI)" for c in cols]
    lines = ["| step | " + " | ".join(heads) + " |", "|---:|" + "---:|" * len(cols)]
    for step, p in points.items():
        cells = [_cell(p[c], c) if c in p else "-" for c in cols]
        lines.append(f"| {step} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
