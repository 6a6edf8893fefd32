"""Agent-loop rollout throughput: MemoryAgent + HFEngine waves vs. each conversation alone with ``generate``.

Workload (defaults): SmolLM2-135M in fp32 on CPU, 4 documents x 4 samples = 16 conversations, each document
exactly 3 chunks of 512 tokens, memory cap 128 tokens, answer cap 32, temperature 1.0 (an RL rollout).

* agent loop: ``MemoryAgent.run`` - every wave batches the next turn of all unfinished conversations in one
  ``HFEngine.generate`` call (identical step-0 prompts of a document share one prefill).
* baseline: the same conversations one after another, each turn one plain ``model.generate`` call
  (sampling, top_k=0, top_p=1.0, log-probs via ``output_logits``), prompts rendered by the same templates.

Both report generated tokens/s and prompt tokens/s (all prompt tokens of all turns / wall time) from the
same run; the ratio is printed. The machine's fp32 matmul ceiling is measured too (square matmuls), and
prefill is timed inside the model's forward (calls with more than one input position), so the fraction of
the ceiling reached during prefill is reported from FLOPs counted for the prefill shapes actually run.

    python benchmarks/bench_rollout.py [--docs 4] [--samples 4] [--chunks 3] [--chunk-tokens 512]
        [--memory-tokens 128] [--answer-tokens 32] [--baseline-limit 16] [--out result.json]
"""

from __future__ import annotations

import argparse
import json
import random
import time
from typing import Any

import torch

from _machine import ceilings, load_average, machine
from memtrain.agent.loop import MemoryAgent
from memtrain.config import AgentConfig
from memtrain.engines.base import SamplingParams
from memtrain.engines.hf import HFEngine
from memtrain.models import load_policy, load_tokenizer
from memtrain.prompts import render, template

WORDS = ["river", "city", "museum", "treaty", "engine", "orbit", "harvest", "castle", "signal", "painter",
         "island", "mineral", "council", "voyage", "theorem", "glacier", "festival", "archive", "bridge"]


def matmul_ceiling(size: int = 2048, repeats: int = 5) -> float:
    """Best-of fp32 GFLOP/s of a square matmul: what this machine's BLAS can do at most."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e9


def make_document(tokenizer: Any, num_tokens: int, seed: int) -> str:
    """Pseudo-text of exactly ``num_tokens`` tokens (re-tokenization checked by the agent's chunker)."""
    rng = random.Random(seed)
    sentences = []
    i = 0
    while True:
        i += 1
        sentences.append(f"Document {i}: the {rng.choice(WORDS)} of {rng.choice(WORDS).title()} was built "
                         f"in {rng.randint(1000, 2020)} near the {rng.choice(WORDS)} and the "
                         f"{rng.choice(WORDS)}.")
        ids = tokenizer(" ".join(sentences), add_special_tokens=False)["input_ids"]
        if len(ids) > num_tokens:
            return tokenizer.decode(ids[:num_tokens])


class PrefillTimer:
    """Wraps ``model.forward``: times calls with more than one position (prefill) and counts their FLOPs."""

    def __init__(self, model: Any) -> None:
        self.model = model
        c = model.config
        self.hidden, self.layers, self.vocab = c.hidden_size, c.num_hidden_layers, c.vocab_size
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        kv = c.num_key_value_heads * head_dim
        per_layer = self.hidden * (self.hidden + 2 * kv + self.hidden) + 3 * self.hidden * c.intermediate_size
        self.linear_params = per_layer * self.layers
        self.seconds = 0.0
        self.flops = 0.0
        self.useful_flops = 0.0
        self.calls = 0
        self._forward = model.forward
        model.forward = self._timed

    def _timed(self, *args: Any, **kwargs: Any) -> Any:
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None or ids.shape[1] == 1:
            return self._forward(*args, **kwargs)
        start = time.perf_counter()
        out = self._forward(*args, **kwargs)
        self.seconds += time.perf_counter() - start
        batch, width = ids.shape
        mask = kwargs.get("attention_mask")
        real = int(mask.sum()) if mask is not None else batch * width
        keep = kwargs.get("logits_to_keep", 0) or width
        # linear layers + attention (QK^T and AV over the full square: SDPA computes it) + the LM head
        self.flops += (2 * self.linear_params * batch * width + 4 * self.layers * batch * width * width
                       * self.hidden + 2 * self.hidden * self.vocab * batch * keep)
        self.useful_flops += 2 * self.linear_params * real
        self.calls += 1
        return out

    def reset(self) -> None:
        self.seconds = self.flops = self.useful_flops = 0.0
        self.calls = 0


def run_agent(agent: MemoryAgent, samples: list[dict], n: int, seed: int) -> dict[str, float]:
    start, cpu = time.perf_counter(), time.process_time()
    trajs = agent.run(samples, SamplingParams(temperature=1.0, top_p=1.0, seed=seed), n=n)
    elapsed = time.perf_counter() - start
    return {"seconds": elapsed, "cpu_seconds": time.process_time() - cpu, "conversations": len(trajs),
            "prompt_tokens": sum(len(t.prompt_ids) for tr in trajs for t in tr.turns),
            "generated_tokens": sum(len(t.completion_ids) for tr in trajs for t in tr.turns),
            "turns": sum(len(tr.turns) for tr in trajs)}


def run_alone(model: Any, tokenizer: Any, cfg: AgentConfig, agent: MemoryAgent, samples: list[dict], n: int,
              limit: int, seed: int) -> dict[str, float]:
    """Each conversation on its own, one ``model.generate`` per turn, same templates and budgets."""
    eos = model.generation_config.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos]) | {tokenizer.eos_token_id}
    torch.manual_seed(seed)
    stats = {"seconds": 0.0, "cpu_seconds": 0.0, "conversations": 0, "prompt_tokens": 0,
             "generated_tokens": 0, "turns": 0}
    convs = [(s, j) for j in range(n) for s in samples][:limit]  # a limit still covers every document
    for sample, _ in convs:
        chunks = agent.chunk(sample).chunks
        memory = template("initial_memory", cfg.templates)
        start, cpu = time.perf_counter(), time.process_time()
        for t in range(len(chunks) + 1):
            final = t == len(chunks)
            if final:
                _, ids = render(tokenizer, "final", cfg.templates, problem=sample["question"], memory=memory)
            else:
                _, ids = render(tokenizer, "memory", cfg.templates, problem=sample["question"], memory=memory,
                                chunk=chunks[t])
            with torch.no_grad():
                out = model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids),
                                     dtype=torch.long), do_sample=True, temperature=1.0, top_p=1.0, top_k=0,
                                     max_new_tokens=cfg.answer_tokens if final else cfg.memory_tokens,
                                     output_logits=True, return_dict_in_generate=True,
                                     pad_token_id=tokenizer.pad_token_id)
                new = out.sequences[0, len(ids):].tolist()
                logits = torch.stack(out.logits, dim=1)[0].float()
                torch.log_softmax(logits, dim=-1).gather(1, torch.tensor(new)[:, None])
            length = next((k + 1 for k, tok in enumerate(new) if tok in eos_ids), len(new))
            stats["prompt_tokens"] += len(ids)
            stats["generated_tokens"] += length
            stats["turns"] += 1
            memory = tokenizer.decode(new[:length], skip_special_tokens=True).strip() or memory
        stats["seconds"] += time.perf_counter() - start
        stats["cpu_seconds"] += time.process_time() - cpu
        stats["conversations"] += 1
    return stats


def summarise(name: str, s: dict[str, float], timer: PrefillTimer, ceiling: float) -> dict[str, Any]:
    """Rates of one run plus its prefill figures; printed at once, so a long run shows progress."""
    gen_rate = s["generated_tokens"] / s["seconds"]
    prompt_rate = s["prompt_tokens"] / s["seconds"]
    prefill_gflops = timer.flops / timer.seconds / 1e9 if timer.seconds else 0.0
    print(f"{name:>22}: {s['conversations']:3d} conversations, {s['turns']:3d} turns, "
          f"{s['seconds']:7.1f} s ({s['cpu_seconds']:.0f} CPU-s), {s['generated_tokens']:6d} generated "
          f"({gen_rate:6.2f}/s), {s['prompt_tokens']:6d} prompt tokens ({prompt_rate:7.1f}/s); "
          f"prefill {timer.seconds:.1f} s in {timer.calls} calls at {prefill_gflops:.1f} GFLOP/s = "
          f"{prefill_gflops / ceiling:.0%} of the ceiling ({timer.useful_flops / max(timer.flops, 1.0):.0%} "
          "of those FLOPs on real tokens' linear layers)", flush=True)
    return {"name": name, **s, "generated_per_s": gen_rate, "prompt_per_s": prompt_rate,
            "prefill_seconds": timer.seconds, "prefill_calls": timer.calls, "prefill_gflops": prefill_gflops,
            "prefill_fraction_of_ceiling": prefill_gflops / ceiling,
            "prefill_useful_fraction": timer.useful_flops / max(timer.flops, 1.0)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--docs", type=int, default=4)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--chunks", type=int, default=3)
    parser.add_argument("--chunk-tokens", type=int, default=512)
    parser.add_argument("--memory-tokens", type=int, default=128)
    parser.add_argument("--answer-tokens", type=int, default=32)
    parser.add_argument("--baseline-limit", type=int, default=None,
                        help="run only this many conversations alone (rates are per token; default: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="also write the figures as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(2)
    print(f"machine: {machine()}")
    ceiling = matmul_ceiling()
    print(f"fp32 matmul ceiling (2048^3, best of 5): {ceiling:.1f} GFLOP/s (this benchmark runs in fp32)")
    ceilings()  # and both dtypes' ceilings, for comparison with the bf16 figures of bench_engine

    tokenizer = load_tokenizer(args.model)
    model = load_policy(args.model, dtype="float32", device="cpu")
    cfg = AgentConfig(chunk_tokens=args.chunk_tokens, memory_tokens=args.memory_tokens,
                      answer_tokens=args.answer_tokens, max_chunks=args.chunks)
    samples = [{"id": f"doc{i}", "context": make_document(tokenizer, args.chunks * args.chunk_tokens, i),
                "question": "Which building was built first?", "answers": ["x"]} for i in range(args.docs)]
    agent = MemoryAgent(HFEngine(model, tokenizer), tokenizer, cfg)
    assert all(len(agent.chunk(s).chunks) == args.chunks for s in samples)
    print(f"model {args.model} (fp32), {args.docs} documents x {args.samples} samples, {args.chunks} "
          f"chunks of {args.chunk_tokens} tokens, memory cap {args.memory_tokens}, "
          f"answer cap {args.answer_tokens}, temperature 1.0")
    timer = PrefillTimer(model)

    rows = []
    agent_stats = run_agent(agent, samples, args.samples, args.seed)
    rows.append(summarise("agent loop (waves)", agent_stats, timer, ceiling))
    timer.reset()
    limit = args.baseline_limit or args.docs * args.samples
    alone = run_alone(model, tokenizer, cfg, agent, samples, args.samples, limit, args.seed)
    rows.append(summarise("each alone (generate)", alone, timer, ceiling))
    gen_cpu = [r["generated_tokens"] / r["cpu_seconds"] for r in rows]
    prompt_cpu = [r["prompt_tokens"] / r["cpu_seconds"] for r in rows]
    print(f"per CPU-second of this process (less sensitive to other jobs): generated tokens "
          f"{gen_cpu[0]:.2f} vs {gen_cpu[1]:.2f} = x{gen_cpu[0] / gen_cpu[1]:.2f}; prompt tokens "
          f"{prompt_cpu[0]:.1f} vs {prompt_cpu[1]:.1f} = x{prompt_cpu[0] / prompt_cpu[1]:.2f}")
    ratio_gen = rows[0]["generated_per_s"] / rows[1]["generated_per_s"]
    ratio_prompt = rows[0]["prompt_per_s"] / rows[1]["prompt_per_s"]
    print(f"speed-up of the agent loop: generated tokens/s x{ratio_gen:.2f}, "
          f"prompt tokens/s x{ratio_prompt:.2f}")
    print(f"agent stats: {agent.stats}, cap rates {agent.cap_rates()}")
    print(f"load average at the end: {load_average()}")
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump({"machine": machine(), "ceiling_gflops": ceiling, "rows": rows,
                       "ratio_generated": ratio_gen, "ratio_prompt": ratio_prompt, "args": vars(args)}, f,
                      indent=2)


if __name__ == "__main__":
    main()
