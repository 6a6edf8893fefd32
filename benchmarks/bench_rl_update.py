"""GRPO policy-update cost: one ``policy_update`` (forward + backward + AdamW step) and one no-grad
``sequence_logprobs`` pass over an agent-like batch, for several micro-batch token budgets.

The batch mimics memory-agent steps: long prompts (chunk + memory) with short completions, of varied
lengths. Reports wall time, completion tokens trained per second and the padding overhead of the plan.

    python benchmarks/bench_rl_update.py [--model smollm2-135m] [--seqs 4] [--budgets 1024,4096]
"""

from __future__ import annotations

import argparse
import random
import resource
import time

import torch

from _machine import machine
from memtrain.config import OptimConfig, RLConfig
from memtrain.models import load_policy
from memtrain.rl.optim import build_optimizer
from memtrain.rl.update import TrainSequence, plan_micro_batches, policy_update, sequence_logprobs


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def agent_batch(count: int, vocab: int, seed: int = 0) -> list[TrainSequence]:
    rng = random.Random(seed)
    return [TrainSequence([rng.randrange(vocab) for _ in range(rng.randint(200, 600))],
                          [rng.randrange(vocab) for _ in range(rng.randint(32, 96))],
                          advantage=rng.uniform(-1, 1), kind="memory", group=f"g{i % 2}")
            for i in range(count)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--seqs", type=int, default=4)
    parser.add_argument("--budgets", default="1024,4096")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"machine: {machine()}, device {device}", flush=True)
    model = load_policy(args.model, dtype="float32", device=device)
    seqs = agent_batch(args.seqs, model.config.vocab_size)
    lengths = [s.length for s in seqs]
    comp = sum(len(s.completion_ids) for s in seqs)
    print(f"model {args.model}: {args.seqs} sequences, {sum(lengths)} tokens ({comp} completion tokens)",
          flush=True)
    opt = build_optimizer(model, OptimConfig(lr=1e-6))
    policy_update(model, opt, seqs[:1], RLConfig(kl_coef=0.0))  # warm-up (allocations, optimizer state)
    print(f"after warm-up update: peak RSS {peak_rss_gib():.1f} GiB", flush=True)
    for budget in (int(b) for b in args.budgets.split(",")):
        plan = plan_micro_batches(lengths, budget)
        padded = sum(len(mb) * max(lengths[i] for i in mb) for mb in plan)
        cfg = RLConfig(kl_coef=0.0, micro_batch_tokens=budget)
        start = time.perf_counter()
        stats = policy_update(model, opt, seqs, cfg)
        upd = time.perf_counter() - start
        start = time.perf_counter()
        sequence_logprobs(model, seqs, budget)
        fwd = time.perf_counter() - start
        print(f"budget {budget:>6}: {len(plan)} micro-batches, padding {padded / sum(lengths) - 1:6.1%} | "
              f"policy_update {upd:6.2f} s ({comp / upd:7.1f} completion tok/s, "
              f"{sum(lengths) / upd:7.1f} tok/s) | sequence_logprobs {fwd:6.2f} s | "
              f"grad_norm {stats['grad_norm']:.3g} | peak RSS so far {peak_rss_gib():.1f} GiB", flush=True)


if __name__ == "__main__":
    main()
