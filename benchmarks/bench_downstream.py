"""Downstream evaluations with SmolLM2-135M on CPU (needs ../shared/data): honest small-model numbers.

1. Retriever: BM25 index build over the wiki-18 sample, search latency in process and over HTTP.
2. Long-document QA (`memtrain eval longqa`): HotpotQA dev questions, documents of ``--sizes`` paragraphs
   (distractor pool: dev + train + test), memory agent and full-context baseline.
3. Search QA (`memtrain eval searchqa`): 2-objective Bamboogle and NQ tasks, BM25 over the wiki-18 sample
   (1,000 passages: most answers are simply not in it, so this measures the pipeline, not retrieval).

    python benchmarks/bench_downstream.py [--questions 8] [--sizes 20,50] [--chunk-tokens 1024]
        [--memory-tokens 128] [--answer-tokens 32] [--search-tasks 8] [--skip longqa,searchqa] [--threads 2]

Every eval goes through the library functions the CLI calls; run directories (resumable) are kept under
``--out`` and their Markdown tables are printed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch

from _machine import machine

torch.set_num_threads(2)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MEMTRAIN_NO_PROGRESS", "1")

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def bench_retriever(out: Path) -> None:
    from memtrain.data.searchqa import read_qa
    from memtrain.retrieval.server import RetrieverServer
    from memtrain.retrieval.service import Retriever, RetrieverClient

    corpus = SHARED / "wiki18-sample" / "passages.jsonl"
    start = time.perf_counter()
    retriever = Retriever.build(corpus, out / "wiki18-bm25")
    build_s = time.perf_counter() - start
    queries = [q.question for q in read_qa(SHARED / "qa-eval" / "bamboogle.json")][:100]
    start = time.perf_counter()
    for q in queries:
        retriever.search([q], 3)
    local_ms = 1000 * (time.perf_counter() - start) / len(queries)
    server = RetrieverServer(retriever, "127.0.0.1", 0).start()
    client = RetrieverClient(server.url)
    single = []
    for q in queries:
        t = time.perf_counter()
        client.search([q], 3)
        single.append(1000 * (time.perf_counter() - t))
    t = time.perf_counter()
    for i in range(0, len(queries), 32):
        client.search(queries[i : i + 32], 3)
    batched_qps = len(queries) / (time.perf_counter() - t)
    server.stop()
    print(f"\n## retriever: BM25 over {len(retriever)} wiki-18 passages")
    print(f"index build {build_s:.2f} s; in-process search {local_ms:.2f} ms/query; HTTP single query "
          f"p50 {statistics.median(single):.2f} ms, p95 {sorted(single)[int(0.95 * len(single))]:.2f} ms; "
          f"HTTP batches of 32: {batched_qps:.0f} queries/s")


def bench_longqa(args: argparse.Namespace, out: Path) -> None:
    from memtrain.config import load_config
    from memtrain.data.longqa import build_longqa, paragraph_pool, read_hotpotqa, write_longqa
    from memtrain.eval.longqa import run_longqa_eval
    from memtrain.eval.report import TABLE

    sizes = [int(s) for s in args.sizes.split(",")]
    data = out / "longqa-set"
    if not data.exists():
        questions = read_hotpotqa(SHARED / "hotpotqa" / "dev.jsonl")
        files = [SHARED / "hotpotqa" / f"{s}.jsonl" for s in ("dev", "train", "test")]
        pool = paragraph_pool(read_hotpotqa(files))
        write_longqa(data, build_longqa(questions, sizes, args.questions, seed=42, pool=pool), {})
    overrides = ["model.name=smollm2-135m", f"agent.chunk_tokens={args.chunk_tokens}",
                 f"agent.memory_tokens={args.memory_tokens}", f"agent.answer_tokens={args.answer_tokens}",
                 f"agent.max_chunks={args.max_chunks}"]
    for mode in ("memory", "full-context"):
        run = out / f"longqa-{mode}"
        start = time.perf_counter()
        run_longqa_eval(load_config(None, overrides), data, run, mode=mode, batch_size=args.questions)
        print(f"\n## longqa, {mode} ({time.perf_counter() - start:.0f} s wall; resumed: the rest only)")
        print((run / TABLE).read_text())


def bench_searchqa(args: argparse.Namespace, out: Path) -> None:
    from memtrain.config import load_config
    from memtrain.data.searchqa import build_searchqa, write_searchqa
    from memtrain.eval.report import TABLE
    from memtrain.eval.searchqa import run_searchqa_eval

    data = out / "searchqa-set"
    if not data.exists():
        files = [SHARED / "qa-eval" / f"{n}.json" for n in ("bamboogle", "nq")]
        write_searchqa(data, build_searchqa(files, 2, seed=42, num_tasks=args.search_tasks), {})
    cfg = load_config(None, ["model.name=smollm2-135m", f"search.retriever={out / 'wiki18-bm25'}",
                             f"search.max_turns={args.max_turns}",
                             f"search.response_tokens={args.response_tokens}",
                             f"search.results_tokens={args.results_tokens}"])
    run = out / "searchqa"
    start = time.perf_counter()
    run_searchqa_eval(cfg, data, run, batch_size=args.search_tasks)
    print(f"\n## searchqa ({time.perf_counter() - start:.0f} s wall)")
    print((run / TABLE).read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/bench-downstream"))
    p.add_argument("--questions", type=int, default=8)
    p.add_argument("--sizes", default="20,50")
    p.add_argument("--chunk-tokens", type=int, default=1024)
    p.add_argument("--memory-tokens", type=int, default=128)
    p.add_argument("--answer-tokens", type=int, default=32)
    p.add_argument("--max-chunks", type=int, default=8)
    p.add_argument("--search-tasks", type=int, default=8)
    p.add_argument("--max-turns", type=int, default=4)
    p.add_argument("--response-tokens", type=int, default=128)
    p.add_argument("--results-tokens", type=int, default=512)
    p.add_argument("--skip", default="", help="comma-separated: longqa, searchqa")
    p.add_argument("--threads", type=int, default=2,
                   help="torch threads (default 2; on a busy 2-core box 1 is much faster, see docs)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if not SHARED.is_dir():
        raise SystemExit(f"{SHARED} is absent: this benchmark needs the shared reference data")
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"machine: {machine()}")
    skip = set(args.skip.split(","))
    bench_retriever(args.out)
    if "longqa" not in skip:
        bench_longqa(args, args.out)
    if "searchqa" not in skip:
        bench_searchqa(args, args.out)
    print(f"\nmachine at the end: {machine()}")


if __name__ == "__main__":
    main()
