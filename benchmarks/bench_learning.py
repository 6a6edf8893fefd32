"""MemTrain's claim in miniature: does proxy training make the memory better, and does a MemTrain start help
long-document QA post-training (docs/method.md sections 2-5; the paper's "+MemAgent" vs "+MemTrain+MemAgent")?

Every stage is a `memtrain` command run with this interpreter, in its own directory under ``--out``; a stage
whose output is complete is skipped and an interrupted one resumes, so re-running the script continues it.

1. proxy sets: ``--docs`` training documents, and ``--heldout-docs`` held-out ones built with
   ``--exclude-from`` the training set (no Wikipedia article in common);
2. held-out proxy eval (`memtrain eval proxy`, greedy, one IMR question per document drawn from the data
   alone) of the base model, 3. MemTrain proxy training (``--proxy-config``), 4. the same eval of its last
   checkpoint, and `memtrain report base memtrain` (paired differences with bootstrap 95% intervals);
5. long-document QA (HotpotQA from ``../shared/data``): a post-training set of ``--longqa-train-docs``
   paragraphs per document from the train split, held-out dev questions at ``--longqa-sizes`` paragraphs;
6. post-training (``--longqa-config``, final-answer reward only) from the base model and from the MemTrain
   checkpoint with the same budget, 7. both evaluated on the held-out questions, side by side.

    python benchmarks/bench_learning.py [--out runs/bench-learning] [--skip longqa]
        [--proxy-config configs/memtrain_demo_cpu.yaml] [--longqa-config configs/longqa_smollm2_cpu.yaml]
        [--docs 64] [--heldout-docs 64] [--steps 24] [--longqa-steps 10] [--longqa-sizes 10,20]
        [--checkpoint RUN/checkpoints/step_N]   # post-train from an existing MemTrain checkpoint
        [--recipe paper --corpus hf:wikimedia/wikipedia:20231101.en]   # the paper's recipe on GPUs
        [KEY=VALUE ...]    # overrides for the proxy training config, e.g. engine.kind=vllm

Only the ``engine.*`` and ``model.compute_dtype`` overrides also apply to the evaluations and the
post-training (an ``agent.*`` override changes the proxy training alone; both evals use the config's budgets).

``--recipe paper`` swaps in configs/memtrain_qwen2.5_7b.yaml and configs/longqa_qwen2.5_7b.yaml, the paper's
document sizes (N = 150 passages, 29 related, 24k-40k tokens, dense retrieval) and RULER-HotpotQA sizes,
and the configs' own step counts; ``--launcher 'torchrun --nproc-per-node 8'`` runs the two kinds of
training on several GPUs (docs/distributed.md), the rest in one process.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import time
from pathlib import Path

from _machine import load_average, machine

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data" / "hotpotqa"

CPU = {
    "proxy_config": ROOT / "configs" / "memtrain_demo_cpu.yaml",
    "longqa_config": ROOT / "configs" / "longqa_smollm2_cpu.yaml",
    "proxy_data": ["--passages", "4", "--related", "2", "--min-tokens", "300", "--max-tokens", "500",
                   "--retriever", "bm25"],
}
PAPER = {
    "proxy_config": ROOT / "configs" / "memtrain_qwen2.5_7b.yaml",
    "longqa_config": ROOT / "configs" / "longqa_qwen2.5_7b.yaml",
    "proxy_data": ["--passages", "150", "--related", "29", "--min-tokens", "24000", "--max-tokens", "40000",
                   "--retriever", "dense"],
}


LAUNCHER: list[str] = []  # --launcher: what starts `memtrain train` instead of this interpreter


def memtrain(*args: str | Path) -> float:
    """Run one `memtrain` command with this interpreter (training under ``--launcher`` when given); its wall
    seconds (a failing command stops the benchmark)."""
    start_with = LAUNCHER if args[0] == "train" and LAUNCHER else [sys.executable]
    cmd = [*start_with, "-m", "memtrain", *map(str, args)]
    print(f"$ memtrain {' '.join(map(str, args))}   (load average {load_average()})", flush=True)
    start = time.perf_counter()
    subprocess.run(cmd, check=True)
    return time.perf_counter() - start


def done(path: Path) -> bool:
    """A data set or an eval that completed (each writes one of these files last)."""
    return any((path / name).is_file() for name in ("manifest.json", "summary.json", "longqa.json"))


def train(run: Path, *args: str | Path) -> tuple[float, Path]:
    """Train, resume, or do nothing when the run is already at its last step (the trainer says so before it
    loads anything); its wall seconds and the run's last checkpoint as the real directory of that step
    (``checkpoints/step_N``), so that what is evaluated or started from it is named by the step."""
    seconds = memtrain("train", *args, "--out", run, "--resume")
    return seconds, (run / "checkpoints" / "latest").resolve()


def step_overrides(steps: int | None) -> list[str]:
    """Train for ``steps`` and checkpoint at the end (the config's own schedule when None)."""
    return [] if steps is None else [f"train.steps={steps}", f"train.checkpoint_every={steps}"]


def engine_overrides(args: argparse.Namespace) -> list[str]:
    """The overrides that also apply to evaluations and post-training: engine and compute dtype."""
    return [o for o in args.overrides if o.startswith(("engine.", "model.compute_dtype"))]


def proxy_stages(args: argparse.Namespace, recipe: dict, out: Path, timings: dict[str, float]) -> Path:
    """Stages 1-4; the trained checkpoint."""
    train_set, heldout = out / "proxy-train", out / "proxy-heldout"
    if not done(train_set):
        timings["proxy data"] = memtrain("data", "proxy", "--out", train_set, "--num-docs", args.docs,
                                         "--seed", 1, *recipe["proxy_data"])
    if not done(heldout):
        timings["held-out proxy data"] = memtrain(
            "data", "proxy", "--out", heldout, "--num-docs", args.heldout_docs, "--seed", 2,
            "--exclude-from", train_set, *recipe["proxy_data"])
    config = ["--config", recipe["proxy_config"]]
    evaluate = ["--data", heldout, "--batch-size", args.eval_batch, *engine_overrides(args)]
    base = out / "eval-base"
    if not done(base):
        timings["eval base"] = memtrain("eval", "proxy", *config, *evaluate, "--out", base)
    timings["memtrain training"], checkpoint = train(
        out / "memtrain", *config, f"data.path={train_set}", *step_overrides(args.steps), *args.overrides)
    trained = out / f"eval-memtrain-{checkpoint.name}"  # a longer run (more --steps) gets its own eval
    if not done(trained):
        timings["eval memtrain"] = memtrain("eval", "proxy", *config, *evaluate, "--model", checkpoint,
                                            "--out", trained)
    memtrain("report", base, trained, "--labels", "base,memtrain", "--out", out / "proxy-report.md")
    memtrain("plot", out / "memtrain")
    return checkpoint


def longqa_stages(args: argparse.Namespace, recipe: dict, out: Path, checkpoint: Path,
                  timings: dict[str, float]) -> None:
    """Stages 5-7: post-training from the base model and from the MemTrain checkpoint, same budget."""
    train_set, eval_set = out / "longqa-train", out / "longqa-eval"
    if not done(train_set):
        timings["longqa data"] = memtrain("data", "longqa", "--train", "--hotpotqa", SHARED / "train.jsonl",
                                          "--out", train_set, "--num-docs", args.longqa_train_docs)
    if not done(eval_set):
        timings["longqa eval data"] = memtrain(
            "data", "longqa", "--hotpotqa", SHARED / "dev.jsonl", "--pool", SHARED / "test.jsonl", "--out",
            eval_set, "--num-docs", args.longqa_sizes, "--num-questions", args.longqa_questions)
    config = ["--config", recipe["longqa_config"]]
    runs = []
    # the same config and budget from both start points; the MemTrain one is named by its checkpoint step
    for label, start in (("memagent", None), ("memtrain+memagent", checkpoint)):
        run = out / ("post-memagent" if start is None else f"post-memtrain-{start.name}")
        model = [] if start is None else [f"model.name={start}"]
        timings[f"post-training {label}"], post = train(
            run, *config, f"data.path={train_set}", *model, *step_overrides(args.longqa_steps),
            *engine_overrides(args))
        ev = out / f"eval-{run.name}-{post.name}"
        if not done(ev):
            timings[f"eval {label}"] = memtrain(
                "eval", "longqa", *config, "--model", post, "--data", eval_set, "--out", ev,
                "--batch-size", args.eval_batch, *engine_overrides(args))
        runs.append((label, ev))
    memtrain("report", *(ev for _, ev in runs), "--labels", ",".join(label for label, _ in runs),
             "--out", out / "longqa-report.md")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/bench-learning"))
    p.add_argument("--recipe", choices=("cpu", "paper"), default="cpu")
    p.add_argument("--proxy-config", help="MemTrain training config (default: the recipe's)")
    p.add_argument("--longqa-config", help="long-document QA post-training config (default: the recipe's)")
    p.add_argument("--corpus", help="Wikipedia for the proxy sets (default: the embedded one; the paper "
                   "recipe's 24k-40k-token documents need a full dump, e.g. "
                   "hf:wikimedia/wikipedia:20231101.en)")
    p.add_argument("--launcher", default="",
                   help="command that starts the training runs, e.g. 'torchrun --nproc-per-node 8'")
    p.add_argument("--checkpoint", type=Path,
                   help="a MemTrain checkpoint to post-train from: skips stages 1-4 (e.g. a GPU run's)")
    p.add_argument("--docs", type=int, default=64, help="proxy training documents (cpu recipe)")
    p.add_argument("--heldout-docs", type=int, default=64, help="held-out proxy documents")
    p.add_argument("--steps", type=int, help="MemTrain steps (default: the config's)")
    p.add_argument("--longqa-steps", type=int, help="post-training steps (default: the config's)")
    p.add_argument("--longqa-train-docs", type=int, default=10,
                   help="paragraphs per post-training document")
    p.add_argument("--longqa-sizes", default="10,20",
                   help="paragraphs per held-out document, comma-separated")
    p.add_argument("--longqa-questions", type=int, default=64, help="held-out questions per size")
    p.add_argument("--eval-batch", type=int, default=32, help="documents per eval batch")
    p.add_argument("--skip", default="", help="comma-separated: longqa")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="proxy training config overrides")
    args = p.parse_args()
    recipe = dict(PAPER if args.recipe == "paper" else CPU)
    LAUNCHER[:] = shlex.split(args.launcher)
    if args.corpus:
        recipe["proxy_data"] = [*recipe["proxy_data"], "--corpus", args.corpus]
    if args.recipe == "paper":
        args.docs = max(args.docs, 30000)  # the paper's 30k training documents
        args.longqa_sizes, args.longqa_questions = "50,100,200,400,800,1600,3200,6400", 128
        args.longqa_train_docs = 200
    recipe["proxy_config"] = args.proxy_config or recipe["proxy_config"]
    recipe["longqa_config"] = args.longqa_config or recipe["longqa_config"]
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"machine: {machine()}", flush=True)
    timings: dict[str, float] = {}
    start = time.perf_counter()
    if args.checkpoint:
        checkpoint = Path(args.checkpoint).resolve()
    else:
        checkpoint = proxy_stages(args, recipe, args.out, timings)
    if "longqa" not in args.skip.split(","):
        if not SHARED.is_dir():
            raise SystemExit(f"{SHARED} is absent: the long-document QA part needs the shared HotpotQA files")
        longqa_stages(args, recipe, args.out, checkpoint, timings)
    if (args.out / "proxy-report.md").is_file():
        print("\n## held-out proxy eval: base vs MemTrain\n")
        print((args.out / "proxy-report.md").read_text())
    if (args.out / "longqa-report.md").is_file():
        print("\n## long-document QA after post-training: +MemAgent vs +MemTrain+MemAgent\n")
        print((args.out / "longqa-report.md").read_text())
    print("\n## wall time per stage run now (stages found done are not listed)\n")
    for stage, seconds in timings.items():
        print(f"- {stage}: {seconds:.0f} s")
    print(f"total {time.perf_counter() - start:.0f} s; load average {load_average()}")


if __name__ == "__main__":
    main()
