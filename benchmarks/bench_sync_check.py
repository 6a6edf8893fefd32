"""What the vLLM weight-sync self-check can see on the embedded model in bf16 (#24, item 7).

Trains SmolLM2-135M for a few real GRPO steps (the demo's lr, bf16 autocast over fp32 master weights, samples
from the vLLM engine rewarded by a fixed arbitrary rule so every group has a gradient) and syncs the engine
after each. Per step it prints the engine - trainer gap on the probe text as a multiple of the first sync's
(what the relative check, ``engine.sync_check_ratio``, bounds at 3x: the margin a correct sync keeps) and how
far the trainer's own probe log-probs moved since the first sync (the gap an engine stuck on the first
weights would show).
The last column says which check would stop a run whose engine kept the first sync's weights (the relative
check: ``moved`` beyond 2x the first sync's noise; the fixed bf16 tolerance: max 0.5 / mean 0.1 nats).

    .venv-vllm/bin/python benchmarks/bench_sync_check.py [--steps 10] [--lr 5e-5] [--lora-rank 0]
"""

from __future__ import annotations

import argparse

import torch

from _machine import machine
from memtrain.config import EngineConfig, LoraConfig, RLConfig
from memtrain.engines import make_engine
from memtrain.engines.base import GenerationRequest, SamplingParams
from memtrain.engines.vllm import _Baseline, relative_failure
from memtrain.models import load_policy, load_tokenizer
from memtrain.precision import set_compute_dtype
from memtrain.rl.logprobs import sequence_logprobs
from memtrain.rl.optim import apply_lora
from memtrain.rl.rollout import TrainSequence
from memtrain.rl.update import policy_update

PROMPTS = ["Summarise what a memory agent does when it reads a long document.",
           "Name the capital of France and one river that flows through it.",
           "Write one sentence about the history of the printing press.",
           "What is photosynthesis? Answer briefly."]


def grpo_batch(engine, tok, seed: int) -> list[TrainSequence]:  # type: ignore[no-untyped-def]
    """4 prompts x 4 samples; reward: the share of even token ids (arbitrary, but every group varies)."""
    seqs = []
    for i, text in enumerate(PROMPTS):
        chat = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                       tokenize=False)
        ids = tok(chat, add_special_tokens=False)["input_ids"]
        params = SamplingParams(n=4, temperature=0.8, max_tokens=16, seed=seed * 100 + i)
        outs = engine.generate([GenerationRequest(ids, params)])[0]
        rewards = torch.tensor([sum(t % 2 == 0 for t in o.token_ids) / max(len(o.token_ids), 1)
                                for o in outs])
        adv = (rewards - rewards.mean()).tolist()
        seqs += [TrainSequence(ids, o.token_ids, advantage=a, group=f"g{i}", old_logprobs=o.logprobs)
                 for o, a in zip(outs, adv, strict=True)]
    return seqs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--lora-rank", type=int, default=0, help="train LoRA adapters of this rank (0: full)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    tok = load_tokenizer("smollm2-135m")
    model = load_policy("smollm2-135m", dtype="float32", device="cpu")
    set_compute_dtype(model, torch.bfloat16)
    if args.lora_rank:
        model = apply_lora(model, LoraConfig(rank=args.lora_rank, alpha=2 * args.lora_rank))
    engine = make_engine(EngineConfig(kind="vllm", block_size=32), "smollm2-135m", model=model, tokenizer=tok)
    print(machine())
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    probe = engine._sync.probe

    def measure() -> tuple[torch.Tensor, torch.Tensor]:
        trainer = sequence_logprobs(model, [probe], len(probe.completion_ids) + 1)[0]
        return engine.probe_logprobs(), trainer

    engine.sync_weights(model)
    e0, t0 = measure()
    base = _Baseline(e0, t0, float((e0 - t0).abs().mean()))
    trained = f"LoRA rank {args.lora_rank}" if args.lora_rank else "full fine-tuning"
    print(f"\nlr {args.lr:g}, {trained}; first-sync gap (noise) mean {base.noise:.4f} nats: the relative "
          f"check allows {3 * base.noise:.4f}; the fixed bf16 tolerance: mean 0.1, max 0.5\n")
    print("| step | synced engine: mean gap | / first sync's | trainer moved since the first sync "
          "| an engine that kept the first weights is caught by |")
    print("|---:|---:|---:|---:|---|")
    for step in range(1, args.steps + 1):
        policy_update(model, optimizer, grpo_batch(engine, tok, step), RLConfig(kl_coef=0.0, temperature=0.8))
        engine.sync_weights(model)  # raises SyncCheckError if the synced engine failed the check
        e, t = measure()
        gap, stale = float((e - t).abs().mean()), (e0 - t).abs()
        caught = [name for name, hit in (
            ("relative check", relative_failure(base, e0, t, 3.0, 5e-3) is not None),
            ("fixed tolerance", float(stale.max()) > 0.5 or float(stale.mean()) > 0.1)) if hit]
        print(f"| {step} | {gap:.4f} | {gap / base.noise:.2f} | {float((t - t0).abs().mean()):.4f} | "
              f"{', '.join(caught) or '-'} |", flush=True)


if __name__ == "__main__":
    main()
