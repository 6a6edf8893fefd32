"""``memtrain report RUN [RUN ...]``: several eval runs side by side in one Markdown table.

Proxy runs (``memtrain eval proxy``) get their own table: E2E and IMR metrics with 95% intervals, and each
run minus the first with a paired bootstrap interval over the documents both evaluated.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from memtrain.errors import UserError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="compare eval runs in one table (like the paper's Tables 1 and 2)",
                       description="Rows: runs (labelled by model, or --labels); columns: document sizes "
                       "(longqa) or data sets (searchqa), then the average. Proxy runs: rows are E2E / IMR "
                       "metrics, columns the runs with 95% intervals, then each run minus the first (paired "
                       "bootstrap over the documents both runs evaluated).")
    p.add_argument("runs", nargs="+", type=Path, metavar="RUN", help="directories written by `memtrain eval`")
    p.add_argument("--metric", help="metric to show: strict_em, em, sub_em, f1, span_em or span_f1 (default: "
                   "the main metric of the runs' evaluation, e.g. sub_em for longqa; all of them for proxy)")
    p.add_argument("--labels", help="comma-separated row labels, one per run (default: model names)")
    p.add_argument("--out", type=Path, help="also write the table to this Markdown file")
    p.set_defaults(func=_report)


def _report(args: argparse.Namespace) -> int:
    from memtrain.eval.report import compare_table, load_summary
    from memtrain.io import atomic_write_text

    summaries = [load_summary(r) for r in args.runs]
    if args.labels:
        labels = [x.strip() for x in args.labels.split(",")]
        if len(labels) != len(summaries):
            raise UserError(f"--labels: {len(labels)} labels for {len(summaries)} runs")
    else:
        labels = [str(s.get("model", r.name)) + (f" ({s['mode']})" if s.get("mode") == "full-context" else "")
                  for s, r in zip(summaries, args.runs, strict=True)]
    if summaries and all(s["task"] == "proxy" for s in summaries):
        from memtrain.eval.proxy import compare_proxy

        table = compare_proxy(args.runs, labels, args.metric)
    else:
        table = compare_table(summaries, labels, args.metric)
    print(table, end="")
    if args.out:
        atomic_write_text(args.out, table)
    return 0
