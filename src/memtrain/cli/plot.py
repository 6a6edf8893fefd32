"""``memtrain plot RUN_DIR``: PNG curves of a training run (rewards, KL/loss, lengths, timings)."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plot", help="write PNG curves of a training run from its metrics.jsonl")
    p.add_argument("run_dir", type=Path, help="a `memtrain train` run directory")
    p.add_argument("--out", type=Path, help="where the PNGs go (default RUN_DIR/plots)")
    p.add_argument("--table", action="store_true", help="also print the per-step summary table")
    p.set_defaults(func=_plot)


def _plot(args: argparse.Namespace) -> int:
    from memtrain.rl.metrics import plot_run, read_metrics, summary_table, validation_table

    paths = plot_run(args.run_dir, args.out)
    if args.table:
        rows = read_metrics(args.run_dir)
        print(summary_table(rows))
        validations = validation_table(args.run_dir, rows)
        if validations:
            print(f"\nvalidation on train.eval_data ({args.run_dir}/eval/step_N):")
            print(validations)
    for path in paths:
        print(path)
    return 0
