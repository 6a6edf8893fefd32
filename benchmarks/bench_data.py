"""Proxy-data pipeline throughput on the embedded Wikipedia corpus.

Stages (passages per second): spaCy NER (NER-only pipeline, 1 and ``--workers`` processes), sentence
embeddings (MiniLM), BM25 indexing; then end to end (samples per second, wall time, peak RSS including
worker processes) for ``memtrain data proxy`` with BM25 and with the dense retriever, each in a fresh child
process with a cold cache (passage store, NER cache and index all rebuilt).

    python benchmarks/bench_data.py [--num-docs 1000] [--passages 150] [--related 29] [--e2e bm25,dense]
                                    [--stage-passages 2000] [--skip-stages]

The embedded corpus has ~100-token passages, so 150-passage documents are ~16k tokens: the paper's 24k-40k
range is out of reach and the end-to-end runs use ``--min-tokens 12000 --max-tokens 40000``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from _machine import machine

torch.set_num_threads(2)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MEMTRAIN_NO_PROGRESS", "1")


def peak_rss_gib(workers: int) -> float:
    """Upper bound of the peak resident set: this process's peak + ``workers`` times the largest finished
    child's (spaCy worker processes run side by side); ru_maxrss is in KiB on Linux."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return (own + workers * kids) / (1 << 20)


def stages(n: int, workers: int) -> dict[str, float]:
    from memtrain.data.corpus import open_store
    from memtrain.data.entities import EntityTagger
    from memtrain.retrieval.index import BM25Index, DenseIndex

    out: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        store = open_store("wikipedia-vital", Path(tmp))
        texts = store.all_texts()
        sample = texts[:n]
        for w in sorted({1, workers}):
            tagger = EntityTagger(
                lambda rows, s=sample: [s[r] for r in rows], store.key, None, None, workers=w, min_parallel=1
            )
            tagger.nlp  # noqa: B018  (load outside the timing)
            start = time.perf_counter()
            tagger(range(len(sample)))
            out[f"ner_passages_per_s_workers{w}"] = len(sample) / (time.perf_counter() - start)
        encoder = DenseIndex(None, "minilm")
        encoder.encode(sample[:16])  # warm-up
        emb = sample[: max(64, n // 4)]
        for bs in (32, 64):
            start = time.perf_counter()
            encoder.encode(emb, batch_size=bs)
            out[f"embed_passages_per_s_batch{bs}"] = len(emb) / (time.perf_counter() - start)
        start = time.perf_counter()
        BM25Index.build(texts)
        out["bm25_index_passages_per_s"] = len(texts) / (time.perf_counter() - start)
        out["bm25_index_passages"] = len(texts)
    return out


def cpu_seconds() -> float:
    """CPU time (user + system) of this process and its finished children: on a shared, oversubscribed
    machine, CPU time / 2 estimates the wall time on 2 dedicated cores."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def e2e_child(args: argparse.Namespace) -> None:
    """Runs in a child process: one cold end-to-end build; prints one JSON line."""
    from memtrain.data.proxy import ProxyConfig, build_proxy_dataset

    with tempfile.TemporaryDirectory() as tmp:
        cfg = ProxyConfig(
            out=str(Path(tmp) / "out"),
            cache_dir=str(Path(tmp) / "cache"),
            retriever=args.child,
            num_docs=args.num_docs,
            passages=args.passages,
            related=args.related,
            min_tokens=args.min_tokens,
            max_tokens=args.max_tokens,
            workers=args.workers,
        )
        start, cpu_start = time.perf_counter(), cpu_seconds()
        manifest = build_proxy_dataset(cfg)
        wall, cpu = time.perf_counter() - start, cpu_seconds() - cpu_start
    print(
        json.dumps(
            {
                "retriever": args.child,
                "docs": manifest["num_rows"],
                "wall_s": round(wall, 1),
                "cpu_s": round(cpu, 1),
                "samples_per_s": round(manifest["num_rows"] / wall, 2),
                "peak_rss_gib_upper_bound": round(peak_rss_gib(args.workers), 2),
                "timings_s": manifest["timings_s"],
                "token_stats": manifest["token_stats"],
                "skipped": manifest["skipped"],
                "ner_tagged": manifest["ner_cache"]["passages_tagged_now"],
            }
        )
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-docs", type=int, default=1000)
    p.add_argument("--passages", type=int, default=150)
    p.add_argument("--related", type=int, default=29)
    p.add_argument("--min-tokens", type=int, default=12000)
    p.add_argument("--max-tokens", type=int, default=40000)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument(
        "--e2e", default="bm25,dense", help="comma-separated retrievers to run end to end ('' = none)"
    )
    p.add_argument("--stage-passages", type=int, default=2000)
    p.add_argument("--skip-stages", action="store_true")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        e2e_child(args)
        return
    print(f"machine: {machine()}")
    if not args.skip_stages:
        for k, v in stages(args.stage_passages, args.workers).items():
            print(f"{k:34s} {v:10.1f}")
    for retriever in [r for r in args.e2e.split(",") if r]:
        cmd = [
            sys.executable,
            __file__,
            "--child",
            retriever,
            "--num-docs",
            str(args.num_docs),
            "--passages",
            str(args.passages),
            "--related",
            str(args.related),
            "--min-tokens",
            str(args.min_tokens),
            "--max-tokens",
            str(args.max_tokens),
            "--workers",
            str(args.workers),
        ]
        load_before = os.getloadavg()[0]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            print(f"e2e {retriever}: FAILED\n{proc.stderr[-3000:]}")
            continue
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        result["load_avg_before_after"] = [round(load_before, 1), round(os.getloadavg()[0], 1)]
        print(f"e2e {retriever}: {json.dumps(result)}")


if __name__ == "__main__":
    main()
