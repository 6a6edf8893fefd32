"""GRPO policy-update cost: one ``policy_update`` (forward + backward + AdamW step) and one no-grad
``sequence_logprobs`` pass over an agent-like batch, for several micro-batch token budgets.

The batch mimics memory-agent steps: long prompts (chunk + memory) with short completions, of varied
lengths, plus ``--imr-groups`` IMR groups (``--g2`` short answers sampled from one memory + chunk prompt),
each run with ``rl.share_prompts`` off and on (a group's prompt once, its answers on its KV cache).
Reports wall time, completion tokens trained per second and the padding overhead of the plan,
for each compute dtype (``model.compute_dtype``: bf16 autocast over the same fp32 master weights) in the
same run, with the fp32 and bf16 matmul ceilings measured first and each phase as a percentage of the
ceiling of the dtype it ran in (FLOPs estimated from the model shape: forward 2 x params x tokens +
attention + LM head on the kept positions, the update 3x that).

    python benchmarks/bench_rl_update.py [--model smollm2-135m] [--seqs 4] [--budgets 1024,4096]
                                         [--compute-dtypes float32,bfloat16] [--imr-groups 4 --g2 8]
                                         [--template-tokens 112]
"""

from __future__ import annotations

import argparse
import random
import resource
import time

import torch

from _machine import ceilings, dtype_name, forward_flops, machine
from memtrain.config import OptimConfig, RLConfig
from memtrain.models import load_policy
from memtrain.precision import resolve_compute_dtype, set_compute_dtype
from memtrain.rl import logprobs
from memtrain.rl.logprobs import plan_micro_batches, sequence_logprobs
from memtrain.rl.optim import build_optimizer
from memtrain.rl.rollout import TrainSequence
from memtrain.rl.update import policy_update


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def agent_batch(count: int, vocab: int, seed: int = 0, imr_groups: int = 0,
                g2: int = 8, template: int = 0) -> list[TrainSequence]:
    """``count`` memory steps (their prompts start with the same ``template`` tokens, as a prompt template's
    instructions do), then ``imr_groups`` x ``g2`` IMR answers (5-24 tokens) to one prompt each."""
    rng = random.Random(seed)
    head = [rng.randrange(vocab) for _ in range(template)]
    seqs = [TrainSequence(head + [rng.randrange(vocab) for _ in range(rng.randint(200, 600))],
                          [rng.randrange(vocab) for _ in range(rng.randint(32, 96))],
                          advantage=rng.uniform(-1, 1), kind="memory", group=f"g{i % 2}")
            for i in range(count)]
    for g in range(imr_groups):
        prompt = [rng.randrange(vocab) for _ in range(rng.randint(250, 400))]
        seqs += [TrainSequence(prompt, [rng.randrange(vocab) for _ in range(rng.randint(5, 24))],
                               advantage=rng.uniform(-1, 1), kind="imr", group=f"imr{g}") for _ in range(g2)]
    return seqs


def timed(model: torch.nn.Module, opt: torch.optim.Optimizer, seqs: list[TrainSequence], budget: int,
          repeats: int, share: bool) -> tuple[float, float, dict]:
    """Best-of-``repeats`` seconds of one policy_update and of one sequence_logprobs pass, and the stats."""
    cfg = RLConfig(kl_coef=0.0, micro_batch_tokens=budget, share_prompts=share)
    upd = fwd = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        stats = policy_update(model, opt, seqs, cfg)
        upd = min(upd, time.perf_counter() - start)
        start = time.perf_counter()
        sequence_logprobs(model, seqs, budget, share_prompts=share)
        fwd = min(fwd, time.perf_counter() - start)
    return upd, fwd, stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--seqs", type=int, default=4)
    parser.add_argument("--budgets", default="1024,4096")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--compute-dtypes", default="float32,bfloat16",
                        help="comma-separated model.compute_dtype values, each run on the same batch")
    parser.add_argument("--repeats", type=int, default=1, help="timed updates per setting (best is kept)")
    parser.add_argument("--imr-groups", type=int, default=0, help="IMR groups in the batch (one prompt each)")
    parser.add_argument("--g2", type=int, default=8, help="answers per IMR group")
    parser.add_argument("--template-tokens", type=int, default=0,
                        help="leading tokens all memory steps share (the demo's memory template: 112); "
                        "adds a run sharing whole prompts only, to measure what sharing this prefix gives")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"machine: {machine()}, device {device}", flush=True)
    ceiling = ceilings(device)
    model = load_policy(args.model, dtype="float32", device=device)
    seqs = agent_batch(args.seqs, model.config.vocab_size, imr_groups=args.imr_groups, g2=args.g2,
                       template=args.template_tokens)
    lengths = [s.length for s in seqs]
    comp = sum(len(s.completion_ids) for s in seqs)
    print(f"model {args.model}: {len(seqs)} sequences ({args.imr_groups} IMR groups of {args.g2}), "
          f"{sum(lengths)} tokens ({comp} completion tokens)", flush=True)
    opt = build_optimizer(model, OptimConfig(lr=1e-6))
    dtypes = [resolve_compute_dtype(name, device) for name in args.compute_dtypes.split(",")]
    for dtype in dtypes:  # warm-up per dtype (allocations, optimizer state, oneDNN bf16 kernels)
        set_compute_dtype(model, dtype)
        policy_update(model, opt, seqs[:1], RLConfig(kl_coef=0.0))
    print(f"after warm-up updates: peak RSS {peak_rss_gib():.1f} GiB", flush=True)
    for budget in (int(b) for b in args.budgets.split(",")):
        plan = plan_micro_batches(lengths, budget)
        padded = sum(len(mb) * max(lengths[i] for i in mb) for mb in plan)
        flops = sum(forward_flops(model, [max(lengths[i] for i in mb)] * len(mb),
                                  len(mb) * (max(lengths[i] for i in mb)
                                             - min(len(seqs[i].prompt_ids) for i in mb) + 1))
                    for mb in plan)
        speed: dict[torch.dtype, tuple[float, float]] = {}
        for dtype in dtypes:
            set_compute_dtype(model, dtype)
            upd, fwd, stats = timed(model, opt, seqs, budget, args.repeats, share=False)  # the FLOPs above
            speed[dtype] = (upd, fwd)
            peak = ceiling[dtype]
            gflops = 3 * flops / upd / 1e9
            print(f"budget {budget:>6} {dtype_name(dtype)}: {len(plan)} micro-batches, padding "
                  f"{padded / sum(lengths) - 1:6.1%} | policy_update {upd:6.2f} s ({comp / upd:7.1f} "
                  f"completion tok/s, {sum(lengths) / upd:7.1f} tok/s, {gflops:5.0f} GFLOP/s = "
                  f"{gflops / peak:4.0%} of the {dtype_name(dtype)} ceiling) | "
                  f"sequence_logprobs {fwd:6.2f} s ({flops / fwd / 1e9 / peak:4.0%}) | "
                  f"grad_norm {stats['grad_norm']:.3g} | peak RSS so far {peak_rss_gib():.1f} GiB",
                  flush=True)
            if args.imr_groups or args.template_tokens:
                s_upd, s_fwd, s_stats = timed(model, opt, seqs, budget, args.repeats, share=True)
                print(f"budget {budget:>6} {dtype_name(dtype)}: rl.share_prompts on: "
                      f"{int(s_stats['num_micro_batches'])} micro-batches | policy_update {s_upd:6.2f} s "
                      f"(x{upd / s_upd:.2f} vs off) | sequence_logprobs {s_fwd:6.2f} s "
                      f"(x{fwd / s_fwd:.2f}) | loss {s_stats['loss']:.6g} vs {stats['loss']:.6g} off "
                      "(same run, same batch)", flush=True)
            if args.template_tokens:  # what sharing the template prefix adds: whole shared prompts only
                saved, logprobs.MIN_SHARED_PREFIX = logprobs.MIN_SHARED_PREFIX, 10**9  # no prefix qualifies
                try:
                    w_upd, w_fwd, w_stats = timed(model, opt, seqs, budget, args.repeats, share=True)
                finally:
                    logprobs.MIN_SHARED_PREFIX = saved
                print(f"budget {budget:>6} {dtype_name(dtype)}: whole shared prompts only: "
                      f"{int(w_stats['num_micro_batches'])} micro-batches | policy_update {w_upd:6.2f} s "
                      f"(sharing the template prefix: x{w_upd / s_upd:.2f}) | sequence_logprobs "
                      f"{w_fwd:6.2f} s (x{w_fwd / s_fwd:.2f}) | loss {w_stats['loss']:.6g}", flush=True)
        if torch.float32 in speed and torch.bfloat16 in speed:
            (u32, f32), (u16, f16) = speed[torch.float32], speed[torch.bfloat16]
            print(f"budget {budget:>6}: bf16 / fp32 speed-up: policy_update x{u32 / u16:.2f}, "
                  f"sequence_logprobs x{f32 / f16:.2f} (same run, same batch)", flush=True)


if __name__ == "__main__":
    main()
