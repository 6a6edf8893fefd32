"""Does the demo's learning replicate? Run ``make demo``'s script for several seeds and pool them (#22).

Each seed changes the training seed and the data seeds (training and held-out sets: other Wikipedia
articles, other masked entities), so one lucky draw cannot carry the result. Per seed: the held-out base
(step 0) vs trained (last step) table of the headline metric (the run's reward metric, IMR part: the E2E
part of a 135M model stays near 0), with answer length and the label-in-memory rate next to it. Then the
pooled paired difference over seeds x documents with a two-level bootstrap (seeds, then documents within
them: ``memtrain.eval.stats.pooled_paired_ci``). The stored predictions are graded with today's scorer
(``document_scores(..., rescore=True)``), so runs made before a scorer fix are reported under it.

    python benchmarks/bench_seeds.py --seeds 1,2,3          # runs scripts/demo.sh per seed (resumable)
    python benchmarks/bench_seeds.py --seeds 1,2,3 --report-only
    MEMTRAIN_DEMO_ENGINE=hf python benchmarks/bench_seeds.py --seeds 1,2,3   # the HF engine instead

The recipe is configs/memtrain_demo_cpu.yaml, as the demo runs it (another recipe is another config file:
--config). A variant of it: ``--set KEY=VALUE`` (repeatable) runs the same seeds on the same data with the
overrides, in its own run directories, and adds the paired difference variant - recipe (trained vs trained on
the same held-out documents) where the recipe's runs are there:

    python benchmarks/bench_seeds.py --seeds 1,2,3 --set rl.imr_credit=writer
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

from _machine import cpu_model, load_average, machine
from memtrain.eval.proxy import document_scores
from memtrain.eval.stats import bootstrap_ci, paired_difference_ci, pooled_paired_ci
from memtrain.rl.metrics import read_metrics, validation_dirs

ROOT = Path(__file__).resolve().parents[1]


def run_demo(seed: int, run: Path, data: Path, config: Path, engine: str | None, sets: list[str]) -> float:
    env = {**os.environ, "MEMTRAIN_DEMO_SEED": str(seed), "MEMTRAIN_DEMO_RUN": str(run),
           "MEMTRAIN_DEMO_DATA": str(data), "MEMTRAIN_DEMO_CONFIG": str(config),
           "MEMTRAIN_DEMO_SET": " ".join(sets)}
    if engine:
        env["MEMTRAIN_DEMO_ENGINE"] = engine
    start = time.time()
    subprocess.run(["bash", str(ROOT / "scripts" / "demo.sh")], cwd=ROOT, env=env, check=True)
    return time.time() - start


def _fmt(ci: object, scale: float = 100.0, signed: bool = False) -> str:
    mean, lo, hi = (scale * getattr(ci, k) for k in ("mean", "lo", "hi"))
    return f"{mean:+.2f} [{lo:+.2f}, {hi:+.2f}]" if signed else f"{mean:.2f} [{lo:.2f}, {hi:.2f}]"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", default="1,2,3", help="comma-separated seeds (default 1,2,3)")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "seeds", help="runs and data go here")
    ap.add_argument("--config", type=Path, default=ROOT / "configs" / "memtrain_demo_cpu.yaml")
    ap.add_argument("--part", default="imr", choices=("imr", "e2e"), help="headline part (default imr)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="run a variant of the recipe with this override (repeatable)")
    ap.add_argument("--report-only", action="store_true", help="only report the runs already there")
    args = ap.parse_args()
    for item in args.set:
        if "=" not in item or " " in item:
            ap.error(f"--set {item!r}: expected KEY=VALUE without spaces, e.g. rl.imr_credit=writer")
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    config = yaml.safe_load(args.config.read_text())
    metric = (config.get("rl") or {}).get("reward_metric") or "strict_em"
    engine = os.environ.get("MEMTRAIN_DEMO_ENGINE")
    print(machine())
    walls = {}
    runs = {}
    tag = args.config.stem + "".join(f"+{item}" for item in args.set)
    for seed in seeds:
        run = args.out / f"{tag}-s{seed}"
        runs[seed] = run
        if not args.report_only:
            walls[seed] = run_demo(seed, run, args.out / f"data-s{seed}", args.config, engine, args.set)
            print(f"seed {seed}: demo script {walls[seed]:.0f}s (load average {load_average()})", flush=True)
    print(f"\nheld-out {args.part} `{metric}` (%), base (step 0) vs trained (last step); config "
          f"{args.config.name}{''.join(' ' + item for item in args.set)}; CPU {cpu_model()}\n")
    print("| seed | steps | steps that updated | base | trained | trained - base (paired 95% CI) "
          "| answer words base -> trained | label in memory, trained - base |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    pairs, memory_pairs = [], []
    for seed, run in runs.items():
        vals = validation_dirs(run)
        if 0 not in vals or len(vals) < 2:
            print(f"| {seed} | (no finished run in {run}) |")
            continue
        last = max(vals)
        base, trained = (document_scores(vals[s], args.part, metric, rescore=True) for s in (0, last))
        words = [document_scores(vals[s], args.part, "answer_words") for s in (0, last)]
        memory = [document_scores(vals[s], "imr", "in_memory") for s in (0, last)]
        rows = read_metrics(run)
        updated = sum(1 for r in rows if (r.get("kept_groups") or 0) > 0 and not r.get("skipped_empty"))
        pairs.append((base, trained))
        memory_pairs.append((memory[0], memory[1]))
        print(f"| {seed} | {last} | {updated} | {_fmt(bootstrap_ci(list(base.values())))} | "
              f"{_fmt(bootstrap_ci(list(trained.values())))} | "
              f"{_fmt(paired_difference_ci(base, trained), signed=True)} | "
              f"{sum(words[0].values()) / max(len(words[0]), 1):.1f} -> "
              f"{sum(words[1].values()) / max(len(words[1]), 1):.1f} | "
              f"{_fmt(paired_difference_ci(*memory), signed=True)} |")
    if len(pairs) > 1:
        pooled = pooled_paired_ci(pairs)
        mem = pooled_paired_ci(memory_pairs)
        print(f"| pooled ({len(pairs)} seeds, {pooled.n} documents; bootstrap over seeds x documents) "
              f"| | | | | {_fmt(pooled, signed=True)} | | {_fmt(mem, signed=True)} |")
    if args.set:
        compare_with_recipe(runs, args.out / args.config.stem, args.part, metric, " ".join(args.set))
    if walls:
        print("\n" + ", ".join(f"seed {s}: {w / 60:.1f} min" for s, w in walls.items()))
    sys.stdout.flush()


def compare_with_recipe(runs: dict[int, Path], recipe: Path, part: str, metric: str, variant: str) -> None:
    """variant - recipe, both trained (last step), paired over the held-out documents of each seed."""
    print(f"\n`{variant}` - recipe, trained vs trained on the same held-out documents (paired 95% CI):\n")
    print("| seed | recipe trained | variant trained | variant - recipe |")
    print("|---:|---:|---:|---:|")
    pairs = []
    for seed, run in runs.items():
        mine, theirs = validation_dirs(run), validation_dirs(Path(f"{recipe}-s{seed}"))
        if len(mine) < 2 or len(theirs) < 2:
            print(f"| {seed} | (a finished run of both is needed) | | |")
            continue
        ours = document_scores(mine[max(mine)], part, metric, rescore=True)
        recipe_scores = document_scores(theirs[max(theirs)], part, metric, rescore=True)
        pairs.append((recipe_scores, ours))
        print(f"| {seed} | {_fmt(bootstrap_ci(list(recipe_scores.values())))} | "
              f"{_fmt(bootstrap_ci(list(ours.values())))} | "
              f"{_fmt(paired_difference_ci(recipe_scores, ours), signed=True)} |")
    if len(pairs) > 1:
        pooled = pooled_paired_ci(pairs)
        print(f"| pooled ({len(pairs)} seeds, {pooled.n} documents) | | | {_fmt(pooled, signed=True)} |")


if __name__ == "__main__":
    main()
