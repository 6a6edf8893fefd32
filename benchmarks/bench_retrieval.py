"""Dense index structures at scale (#27): build time, bytes per vector, recall@10 against flat, queries/s.

Real passages: the embedded Wikipedia corpus (``wikipedia-vital``) cut into windows of 2 sentences, embedded
with MiniLM (384-d) into resumable shards (``memtrain.retrieval.embed``; rerun to resume). Larger sets are
DERIVED from those real embeddings: each derived vector is normalise(a * v_i + (1 - a) * v_j) for two random
real vectors and a ~ U(0.5, 1), so it lies where real embeddings lie without being a copy of one. Queries are
real embeddings of windows held out of the indexed set. Recall@10 = |approximate top 10 & flat top 10| / 10.

    python benchmarks/bench_retrieval.py --passages 100000 --derived 1000000 --out runs/bench-retrieval
"""

from __future__ import annotations

import argparse
import re
import time
from pathlib import Path

import numpy as np
import torch

from _machine import load_average, machine
from memtrain.data.corpus import iter_articles
from memtrain.retrieval.embed import ShardVectors, embed_in_shards
from memtrain.retrieval.index import DenseIndex


def windows(n: int, size: int = 2) -> list[str]:
    """The first ``n`` windows of ``size`` consecutive sentences (stride 1) of the embedded corpus, distinct
    texts (the corpus's ~10k lead sections hold ~10^5 of them)."""
    out: list[str] = []
    seen: set[str] = set()
    for article in iter_articles("wikipedia-vital"):
        sentences = [s for s in re.split(r"(?<=[.!?])\s+", article.text) if len(s) > 20]
        for i in range(len(sentences) - size + 1):
            text = " ".join(sentences[i:i + size])
            if text not in seen:
                seen.add(text)
                out.append(text)
                if len(out) == n:
                    return out
    return out


def derived(real: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    out = np.empty((n, real.shape[1]), dtype=np.float32)
    for lo in range(0, n, 100_000):
        m = min(100_000, n - lo)
        a = rng.uniform(0.5, 1.0, size=(m, 1)).astype(np.float32)
        x = a * real[rng.integers(0, len(real), m)] + (1 - a) * real[rng.integers(0, len(real), m)]
        out[lo:lo + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def recall(exact: list, approx: list) -> float:
    return float(np.mean([len({r for r, _ in a} & {r for r, _ in e}) / max(len(e), 1)
                          for a, e in zip(approx, exact, strict=True)]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--passages", type=int, default=100_000, help="real sentence windows to embed")
    ap.add_argument("--queries", type=int, default=1000, help="held-out real windows used as queries")
    ap.add_argument("--derived", type=int, default=1_000_000, help="vectors in the large set (0: real only)")
    ap.add_argument("--structures", default="ivf-pq,ivf-flat,hnsw", help="approximate structures to measure")
    ap.add_argument("--hnsw-max", type=int, default=200_000, help="build HNSW only up to this many vectors")
    ap.add_argument("--train-size", type=int, default=200_000, help="vectors the IVF/PQ structures train on")
    ap.add_argument("--out", type=Path, default=Path("runs/bench-retrieval"))
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import faiss

    faiss.omp_set_num_threads(args.threads)
    print(machine())
    texts = windows(args.passages + args.queries)
    passages = min(args.passages, len(texts) - args.queries)  # the corpus may hold fewer windows
    print(f"{len(texts)} distinct real windows of 2 sentences (wikipedia-vital): {passages} indexed, "
          f"{len(texts) - passages} queries")
    encoder = DenseIndex(None, "minilm")
    start = time.time()
    embed_in_shards(texts, args.out / "shards", lambda t: encoder.encode(t, batch_size=128), "minilm", 20_000)
    shards = ShardVectors(args.out / "shards")
    vectors = shards[0:len(shards)]
    print(f"embedded in {time.time() - start:.0f}s (0 if resumed from the shards)")
    real, queries = vectors[:passages], vectors[passages:]
    sets = {"real": real}
    if args.derived:
        sets[f"derived {args.derived:,}"] = derived(real, args.derived)
    print("\n| set | structure | vectors | build s | build s / M | bytes / vector | recall@10 | queries/s |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for name, data in sets.items():
        t0 = time.time()
        flat = DenseIndex.from_vectors(data, "minilm")
        build = time.time() - t0
        t0 = time.time()
        exact = flat.search_vectors(queries, 10)
        qps = len(queries) / (time.time() - t0)
        print(f"| {name} | flat | {len(data):,} | {build:.1f} | {build / len(data) * 1e6:.1f} | "
              f"{data.shape[1] * 4} | 1.000 | {qps:.0f} |", flush=True)
        for structure in args.structures.split(","):
            too_small = structure == "ivf-pq" and len(data) < 9984  # its codebooks need more to train
            if too_small or (structure == "hnsw" and len(data) > args.hnsw_max):
                continue
            t0 = time.time()
            index = DenseIndex.from_vectors(data, "minilm", structure, train_size=args.train_size)
            build = time.time() - t0
            path = args.out / f"{name.split()[0]}-{structure}"
            index.save(path)
            size = (path / "index.faiss").stat().st_size / len(data)
            for rerank in (0, 10) if structure == "ivf-pq" else (0,):
                index.rerank_with(data, rerank)
                t0 = time.time()
                got = index.search_vectors(queries, 10)
                qps = len(queries) / (time.time() - t0)
                what = f"{structure}{' + rerank 10x' if rerank else ''} {index.settings()}"
                print(f"| {name} | {what} | {len(data):,} | {build:.1f} | {build / len(data) * 1e6:.1f} | "
                      f"{size:.0f} | {recall(exact, got):.3f} | {qps:.0f} |", flush=True)
    print(f"\nload average {load_average()}")


if __name__ == "__main__":
    main()
