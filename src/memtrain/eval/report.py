"""Evaluation reports: per-example JSONL (resumable), ``summary.json``, a Markdown table and a PNG plot.

Every evaluation writes into one run directory::

    eval.json        what was evaluated (task, model, data, mode, budgets); a resume must match it
    examples.jsonl   one record per (group, example), appended as results come in
    summary.json     per-group means of every metric (``memtrain.scoring.METRICS``), counts, the average
    results.md       the same as a Markdown table (metrics in %, like the paper's tables), under the
                     summary's ``warnings`` (e.g. a truncated longqa evaluation) and ``protocol``
    accuracy.png     longqa: accuracy vs. document length; searchqa: accuracy per data set

Groups are the document sizes (longqa, labelled by number of paragraphs) or the data sets (searchqa). A
group whose examples could not all be evaluated (full-context mode: document longer than the model's
context) has no metrics and is shown as "too long"; the average is over the groups that have metrics, and
the table says how many that is. ``compare_table`` puts several runs side by side (``memtrain report``),
by default in the metric the task's evaluation registered as its main one (:mod:`memtrain.eval.registry`).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from memtrain.errors import UserError
from memtrain.eval.registry import get_eval
from memtrain.io import (
    LOCK_FILE,
    acquire_dir_lock,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    read_jsonl,
)
from memtrain.scoring import METRICS, REWARD_METRIC

EVAL_META = "eval.json"
EXAMPLES = "examples.jsonl"
SUMMARY = "summary.json"
TABLE = "results.md"
PLOT = "accuracy.png"


def done_keys(out_dir: Path) -> set[str]:
    """Keys of the examples already evaluated in ``out_dir`` (a resume skips them).

    A last line cut short by a crash is removed first, so that new records are not appended onto it.
    """
    path = Path(out_dir) / EXAMPLES
    if not path.is_file():
        return set()
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with path.open("r+b") as fh:
            fh.truncate(data.rfind(b"\n") + 1)
    return {r["key"] for r in read_jsonl(path)}


def _differences(old: Mapping[str, Any], new: Mapping[str, Any], prefix: str = "") -> list[str]:
    """``key: old then, new now`` for every differing key; nested dicts (e.g. ``protocol``) by dotted key."""
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            out += _differences(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}: {a!r} then, {b!r} now")
    return out


def check_resume(out_dir: Path, meta: Mapping[str, Any]) -> None:
    """Start a run directory, or continue one that evaluated exactly the same thing (else a clear error).

    The directory is locked first (``memtrain.io.acquire_dir_lock``) and stays locked until this process
    exits, so two evaluations never append to one ``examples.jsonl``. A new ``eval.json`` is written only
    after a local engine's model has shown it loads (its tokenizer), so a failed start leaves nothing that
    would refuse the same command.
    """
    out_dir = Path(out_dir)
    acquire_dir_lock(out_dir)  # held for the process's lifetime (re-entrant: one process may eval again)
    path = out_dir / EVAL_META
    if path.is_file():
        old = json.loads(path.read_text(encoding="utf-8"))
        diff = _differences(old, meta)
        if diff:
            shown = "; ".join(diff)
            raise UserError(f"{out_dir} holds an evaluation of something else ({shown}); use another --out "
                            "or delete it")
        return
    if out_dir.is_dir() and any(p.name != LOCK_FILE for p in out_dir.iterdir()):
        raise UserError(f"--out {out_dir}: directory is not empty and holds no {EVAL_META}; refusing to mix "
                        "results (choose a new or empty directory)")
    if meta.get("engine") == "hf" and isinstance(meta.get("model"), str):
        from memtrain.models import load_tokenizer

        load_tokenizer(meta["model"])  # a missing or broken model fails in one line before eval.json
    atomic_write_json(path, dict(meta))


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def summarize(records: Iterable[Mapping[str, Any]], task: str, groups: Sequence[str],
              meta: Mapping[str, Any], extra_keys: Sequence[str] = ()) -> dict[str, Any]:
    """Per-group metric means (as fractions) over ``records``, in ``groups`` order, and their average.

    A record with ``"status": "too_long"`` makes its group "too long" (no metrics). ``extra_keys`` are
    numeric record fields averaged per group (e.g. ``turns``, ``malformed``), too-long groups included.
    """
    by_group: dict[str, list[Mapping[str, Any]]] = {g: [] for g in groups}
    for r in records:
        by_group.setdefault(str(r["group"]), []).append(r)
    rows: dict[str, dict[str, Any]] = {}
    for g, recs in by_group.items():
        too_long = sum(r.get("status") == "too_long" for r in recs)
        row: dict[str, Any] = {"n": len(recs), "too_long": too_long}
        if too_long or not recs:
            row["metrics"] = None
        else:
            row["metrics"] = {m: _mean([float(r["metrics"][m]) for r in recs]) for m in METRICS}
        for k in extra_keys:
            row[k] = _mean([float(r.get(k, 0.0)) for r in recs])
        rows[g] = row
    scored = [g for g in rows if rows[g]["metrics"] is not None]
    average = {m: _mean([rows[g]["metrics"][m] for g in scored]) for m in METRICS} if scored else None
    return {"task": task, **dict(meta), "groups": rows, "order": list(by_group), "average": average,
            "average_over": scored, "reward_metric": REWARD_METRIC,
            "main_metric": get_eval(task).main_metric}


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}"


def _num(x: float) -> str:
    return f"{x:.0f}" if abs(x) >= 100 else f"{x:.2f}"


def group_label(task: str) -> str:
    return "docs" if task == "longqa" else "dataset"


def markdown_table(summary: Mapping[str, Any], extra_keys: Sequence[str] = ()) -> str:
    """One row per group with every metric in %, then the average row."""
    task = summary["task"]
    head = [group_label(task), "n", *METRICS, *extra_keys]
    mode = f" ({summary['mode']})" if summary.get("mode") else ""
    lines = [f"# {task}: {summary.get('model', '?')}{mode}", ""]
    lines += [x for w in summary.get("warnings", ()) for x in (f"> **WARNING: {w}**", "")]
    if summary.get("protocol"):  # what defines the numbers (decoding, seed, budgets, chunks read)
        lines += ["Protocol: " + ", ".join(f"{k} `{'none' if v is None else v}`"
                                           for k, v in summary["protocol"].items()), ""]
    lines += [f"Metrics in %; `{summary['reward_metric']}` is the training reward, "
              f"`{summary['main_metric']}` the paper's headline metric.", "",
              "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for g in summary["order"]:
        row = summary["groups"][g]
        if row["metrics"] is None:
            cells = ["too long" if row["too_long"] else "-"] * len(METRICS)
            if row["too_long"]:
                cells[0] = f"too long ({row['too_long']}/{row['n']})"
        else:
            cells = [_pct(row["metrics"][m]) for m in METRICS]
        cells += [_num(row[k]) if k in row else "-" for k in extra_keys]
        lines.append("| " + " | ".join([str(g), str(row["n"]), *cells]) + " |")
    avg = summary["average"]
    label = "average" if len(summary["average_over"]) == len(summary["order"]) else \
        f"average ({len(summary['average_over'])}/{len(summary['order'])})"
    cells = [_pct(avg[m]) if avg else "-" for m in METRICS] + ["" for _ in extra_keys]
    lines.append("| " + " | ".join([f"**{label}**", "", *cells]) + " |")
    return "\n".join(lines) + "\n"


def check_decoding_args(limit: int | None, batch_size: int, temperature: float, top_p: float,
                        unit: str = "examples") -> None:
    """The one-line errors every evaluation gives for bad --limit / --batch-size / --temperature / --top-p."""
    if limit is not None and limit < 1:
        raise UserError(f"--limit {limit}: expected a positive number of {unit}")
    if batch_size < 1:
        raise UserError(f"--batch-size {batch_size}: expected a positive integer")
    if temperature < 0:
        raise UserError(f"--temperature {temperature}: expected >= 0 (0 = greedy)")
    if not 0 < top_p <= 1:
        raise UserError(f"--top-p {top_p}: expected a value in (0, 1]")


def new_figure() -> tuple[Any, Any]:
    """A (figure, axes) pair of the reports' size, drawn off-screen."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(7, 4), dpi=100)


def save_figure(fig: Any, ax: Any, path: Path) -> Path:
    """Finish a report figure (percent axis, grid, legend) and write it as PNG atomically."""
    import io

    import matplotlib.pyplot as plt

    ax.set_ylabel("%")
    ax.set_ylim(0, 100)
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())


def plot(summary: Mapping[str, Any], path: Path, metrics: Sequence[str] = METRICS) -> Path:
    """longqa: each metric vs. number of documents (log x); searchqa: grouped bars per data set."""
    import matplotlib.ticker

    fig, ax = new_figure()
    order = [g for g in summary["order"] if summary["groups"][g]["metrics"] is not None]
    if summary["task"] == "longqa":
        xs = [int(g) for g in order]
        for m in metrics:
            ax.plot(xs, [100 * summary["groups"][g]["metrics"][m] for g in order], marker="o", label=m)
        if len(set(xs)) > 1:
            ax.set_xscale("log")
            ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.set_xticks(xs, [str(x) for x in xs])
        ax.set_xlabel("documents (paragraphs) per question")
    else:
        width = 0.8 / max(len(metrics), 1)
        for i, m in enumerate(metrics):
            ax.bar([j + i * width for j in range(len(order))],
                   [100 * summary["groups"][g]["metrics"][m] for g in order], width, label=m)
        ax.set_xticks([j + width * (len(metrics) - 1) / 2 for j in range(len(order))], order)
        ax.set_xlabel("data set")
    ax.set_title(f"{summary['task']}: {summary.get('model', '?')}")
    ax.grid(alpha=0.3)
    return save_figure(fig, ax, path)


def write_report(out_dir: Path, summary: Mapping[str, Any], extra_keys: Sequence[str] = ()) -> None:
    out_dir = Path(out_dir)
    atomic_write_json(out_dir / SUMMARY, dict(summary))
    atomic_write_text(out_dir / TABLE, markdown_table(summary, extra_keys))
    plot(summary, out_dir / PLOT)


def load_summary(run: str | Path) -> dict[str, Any]:
    """``summary.json`` of an eval run directory (or the file itself)."""
    path = Path(run)
    if path.is_dir():
        path = path / SUMMARY
    if not path.is_file():
        raise FileNotFoundError(f"{run}: no {SUMMARY} (run `memtrain eval ...` with --out {run} first)")
    try:  # any file can be named on the command line
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: not a memtrain eval summary (not valid JSON: {exc})") from None
    if not isinstance(data, dict) or "groups" not in data or "task" not in data:
        raise UserError(f"{path}: not a memtrain eval summary (no 'task'/'groups')")
    return data


def compare_table(summaries: Sequence[Mapping[str, Any]], labels: Sequence[str],
                  metric: str | None = None) -> str:
    """Runs side by side (rows) over the union of their groups (columns) plus the average: Tables 1 and 2."""
    if not summaries:
        raise UserError("memtrain report: give at least one eval run directory")
    tasks = {s["task"] for s in summaries}
    if len(tasks) > 1:
        raise UserError(f"memtrain report: runs of different tasks ({', '.join(sorted(tasks))}) cannot "
                        "share a table")
    task = tasks.pop()
    metric = metric or get_eval(task).main_metric
    if metric not in METRICS:
        raise UserError(f"--metric {metric!r}: expected one of {', '.join(METRICS)}")
    groups: list[str] = []
    for s in summaries:
        groups.extend(g for g in s["order"] if g not in groups)
    if task == "longqa":
        groups.sort(key=int)
    head = ["model", *groups, "average"]
    lines = [f"{task}: `{metric}` in % (average over the groups each run has; * = some groups missing)",
             "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s, label in zip(summaries, labels, strict=True):
        cells = []
        for g in groups:
            row = s["groups"].get(g)
            if row is None:
                cells.append("")
            elif row["metrics"] is None:
                cells.append("too long" if row["too_long"] else "-")
            else:
                cells.append(_pct(row["metrics"][metric]))
        avg = s["average"][metric] if s.get("average") else None
        partial = len(s["average_over"]) < len(groups)
        cells.append(_pct(avg) + ("*" if partial and avg is not None else ""))
        lines.append("| " + " | ".join([label, *cells]) + " |")
    lines += [f"\n**WARNING ({label})**: {w}" for s, label in zip(summaries, labels, strict=True)
              for w in s.get("warnings", ())]
    return "\n".join(lines) + "\n"
