"""Time per GRPO training step of the CPU demo config, split into rollout / reference / update / engine sync.

The loop is the trainer's own (``memtrain.rl.trainer.build_policy``, ``memtrain.rl.collect.collect_rollouts``,
``memtrain.rl.rollout.training_sequences``, ``policy_update``); the reference pass, which ``policy_update``
runs inside its micro-batch loop, is also timed on its own (``sequence_logprobs`` of the frozen reference
over the same sequences) so it can be split off the update time. The DAPO filter is off here
(``rl.dynamic_filter=false``) so every step updates on all its sequences: with it on, an untrained SmolLM2
leaves most groups uniform and the update time would measure mostly nothing. The engine is the config's
(``engine.kind=vllm``: the in-process vLLM engine, which reloads the weights after every update, column
``sync_s``). ``roll%`` and ``upd%``: each phase's share of the hardware bound, its FLOPs (``_machine.
forward_flops``: every distinct prompt's prefill plus one forward token per generated token; forward +
backward over the sequences trained on) at the compute dtype's measured matmul ceiling, over its time.

    python benchmarks/bench_train.py [--config configs/memtrain_demo_cpu.yaml]
                                     [--data runs/memtrain-demo-data] [--steps 2] [KEY=VALUE ...]

Needs the demo dataset (``bash scripts/demo.sh`` builds it, or the ``memtrain data proxy`` line in the
config's header).
"""

from __future__ import annotations

import argparse
import os
import resource
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP: no spinning on a busy box

import torch

from _machine import ceilings, forward_flops, load_average, machine

torch.set_num_threads(2)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MEMTRAIN_NO_PROGRESS", "1")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/memtrain_demo_cpu.yaml")
    parser.add_argument("--data", default="runs/memtrain-demo-data")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()

    from memtrain.config import load_config
    from memtrain.data.dataset import load_rows
    from memtrain.engines.factory import make_engine
    from memtrain.models import load_tokenizer
    from memtrain.precision import autocast_dtype
    from memtrain.rl.collect import collect_rollouts
    from memtrain.rl.logprobs import sequence_logprobs
    from memtrain.rl.optim import build_optimizer, build_scheduler
    from memtrain.rl.rollout import step_metrics, training_sequences
    from memtrain.rl.tasks.registry import check_rows, make_task
    from memtrain.rl.trainer import build_policy
    from memtrain.rl.update import policy_update

    if not (Path(args.data) / "manifest.json").is_file():
        raise SystemExit(
            f"{args.data} holds no dataset: run `bash scripts/demo.sh` (or its `memtrain data proxy` "
            "line) first, or pass --data"
        )
    config = load_config(
        args.config, [f"data.path={args.data}", "rl.dynamic_filter=false", "train.threads=2", *args.overrides]
    )
    torch.manual_seed(config.train.seed)
    tokenizer = load_tokenizer(config.model.name)
    task = make_task(config, tokenizer)
    rows = load_rows(config.data.path)
    check_rows(task, rows, config.data.path)
    model, ref = build_policy(config, "cpu", None)
    optimizer = build_optimizer(model, config.optim)
    scheduler = build_scheduler(optimizer, config.optim.warmup_steps)
    engine = make_engine(config.engine, config.model.name, model=model, tokenizer=tokenizer)
    engine.sync_weights(model)

    print(f"machine: {machine()}")
    ceiling = ceilings()
    compute = autocast_dtype(model) or next(model.parameters()).dtype
    gflops = ceiling.get(compute, ceiling[torch.float32])
    calls: list[tuple[list[int], int]] = []  # per engine call: distinct prompt lengths, generated tokens
    generate = engine.generate

    def counted(requests: list) -> list:
        out = generate(requests)
        calls.append(([len(r.prompt_ids) for r in requests], sum(len(c.token_ids) for cs in out for c in cs)))
        return out

    engine.generate = counted
    print(f"compute dtype: {autocast_dtype(model) or next(model.parameters()).dtype} "
          f"(model.compute_dtype={config.model.compute_dtype})")
    print(
        f"config: {args.config} ({config.model.name}, batch {config.train.batch_size}, G1 "
        f"{config.rl.group_size}, G2 {config.rl.imr_group_size}, chunk {config.agent.chunk_tokens}, memory "
        f"{config.agent.memory_tokens}, max_chunks {config.agent.max_chunks}), dynamic_filter off, engine "
        f"{config.engine.kind}"
    )
    header = (
        f"{'step':>4} {'rollout_s':>9} {'gen_tok':>7} {'gen_tok/s':>9} {'seqs':>5} {'seq_tok':>7} "
        f"{'ref_s':>6} {'update_s':>8} {'upd_tok/s':>9} {'sync_s':>6} {'step_s':>7} {'roll%':>5} {'upd%':>5}"
    )
    print(header)
    position = 0
    totals = {"rollout": 0.0, "ref": 0.0, "update": 0.0, "sync": 0.0, "gen": 0, "tok": 0}
    for step in range(1, args.steps + 1):
        calls.clear()
        t0 = time.perf_counter()
        batch = collect_rollouts(task, rows, engine, config, step, position)
        position = batch.position
        t_roll = time.perf_counter() - t0
        seqs = training_sequences(batch.scored)
        gen = int(step_metrics(batch.scored, batch.counters)["tokens_generated"])
        tokens = sum(s.length for s in seqs)
        t1 = time.perf_counter()
        if ref is not None:
            sequence_logprobs(ref, seqs, config.rl.micro_batch_tokens)
        t_ref = time.perf_counter() - t1
        t2 = time.perf_counter()
        policy_update(
            model, optimizer, seqs, config.rl, ref=ref, scheduler=scheduler, grad_clip=config.optim.grad_clip
        )
        t_upd = max(time.perf_counter() - t2 - t_ref, 1e-9)  # policy_update ran the reference pass too
        t3 = time.perf_counter()
        synced = engine.sync_weights(model)  # the vLLM engine reloads and checks the weights; hf: nothing
        t_sync = time.perf_counter() - t3
        step_s = t_roll + t_ref + t_upd + t_sync
        # hardware bounds at the compute dtype's matmul ceiling: rollout = each distinct prompt's prefill
        # (the n samples of a request share it) + one forward token per generated token; update = forward +
        # backward (3x forward) over every sequence trained on (a bound: shared prompts run once)
        prompts = [n for lengths, _ in calls for n in lengths]
        generated = sum(g for _, g in calls)
        roll_flops = (forward_flops(model, prompts, len(prompts))
                      + forward_flops(model, [1] * generated, generated))
        trained = [s for s in seqs if s.advantage != 0.0] or seqs
        upd_flops = 3 * forward_flops(model, [s.length for s in trained],
                                      sum(len(s.completion_ids) for s in trained))
        roll_pct = 100 * roll_flops / 1e9 / gflops / t_roll
        upd_pct = 100 * upd_flops / 1e9 / gflops / t_upd
        check = {k: round(v, 4) for k, v in synced.items() if k.startswith("sync_logprob")}
        print(
            f"{step:>4} {t_roll:>9.1f} {gen:>7} {gen / t_roll:>9.1f} {len(seqs):>5} {tokens:>7} "
            f"{t_ref:>6.1f} {t_upd:>8.1f} {tokens / t_upd:>9.0f} {t_sync:>6.1f} {step_s:>7.1f} "
            f"{roll_pct:>5.0f} {upd_pct:>5.0f} {check or ''}"
        )
        for k, v in (("rollout", t_roll), ("ref", t_ref), ("update", t_upd), ("sync", t_sync), ("gen", gen),
                     ("tok", tokens)):
            totals[k] += v
    n = args.steps
    print(
        f"mean per step: rollout {totals['rollout'] / n:.1f}s "
        f"({totals['gen'] / totals['rollout']:.1f} generated tok/s), reference {totals['ref'] / n:.1f}s, "
        f"update {totals['update'] / n:.1f}s "
        f"({totals['tok'] / totals['update']:.0f} tok/s forward+backward), sync {totals['sync'] / n:.1f}s, "
        f"step {(totals['rollout'] + totals['ref'] + totals['update'] + totals['sync']) / n:.1f}s"
    )
    print(f"roll% / upd%: the phase's FLOPs at the {compute} matmul ceiling ({gflops:.0f} GFLOP/s) over its "
          "time")
    print(f"peak RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1 << 20):.2f} GiB; load average "
          f"{load_average()}")


if __name__ == "__main__":
    main()
