"""Agent-loop rollout throughput: MemoryAgent waves on each engine, and each conversation alone (generate).

Workload (defaults): SmolLM2-135M (fp32 weights) on CPU, 4 documents x 4 samples = 16 conversations, each
document exactly 3 chunks of 512 tokens, memory cap 128 tokens, answer cap 32, temperature 1.0 (a rollout).

* agent loop: ``MemoryAgent.run`` - every wave batches the next turn of all unfinished conversations in one
  ``generate`` call of the engine (the samples of a document share their step-0 prefill). ``--engines``
  names the engines run on the same workload, one after another: ``hf-fp32``, ``hf-bf16`` (the HF engine
  under that compute dtype, as the trainer sets it), ``vllm-fp32``, ``vllm-bf16`` (the in-process vLLM
  engine built from the same model, eager), ``vllm-bf16-compiled`` (``enforce_eager=false``: torch.compile,
  ~2 minutes the first time, cached). Each engine first serves one short warm-up request (vLLM builds its
  bf16 kernels on the first call).
* baseline (unless ``--skip-alone``): the same conversations one after another, each turn one plain
  ``model.generate`` call in fp32 (sampling, top_k=0, top_p=1.0, log-probs via ``output_logits``), prompts
  rendered by the same templates.

Every run reports generated tokens/s and prompt tokens/s (all prompt tokens of all turns / wall time); the
ratios between runs are printed. The machine's matmul ceilings are measured too, and HF prefill is timed
inside the model's forward (calls with more than one input position), so the fraction of the ceiling reached
during prefill is reported from FLOPs counted for the prefill shapes actually run (not for vLLM, whose
forward is its own). The vLLM engines need the vLLM environment (``make venv-vllm``; docs/vllm.md).

    python benchmarks/bench_rollout.py [--engines hf-fp32,hf-bf16,vllm-bf16] [--skip-alone] [--docs 4]
        [--samples 4] [--chunks 3] [--chunk-tokens 512] [--memory-tokens 128] [--answer-tokens 32]
        [--baseline-limit 16] [--out result.json]
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
from memtrain.config import AgentConfig, EngineConfig
from memtrain.engines.base import Engine, GenerationRequest, SamplingParams
from memtrain.engines.factory import make_engine
from memtrain.engines.hf import HFEngine
from memtrain.models import load_policy, load_tokenizer
from memtrain.precision import set_compute_dtype
from memtrain.prompts import render, template

ENGINES = ("hf-fp32", "hf-bf16", "vllm-fp32", "vllm-bf16", "vllm-fp32-compiled", "vllm-bf16-compiled")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}

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


def build_engine(spec: str, model: Any, tokenizer: Any, model_name: str) -> Engine:
    """The engine ``spec`` (one of ENGINES) over ``model``, whose compute dtype it sets like the trainer."""
    kind, dtype, *compiled = spec.split("-")
    set_compute_dtype(model, DTYPES[dtype])
    if kind == "hf":
        return HFEngine(model, tokenizer)
    cfg = EngineConfig(kind="vllm", enforce_eager=not compiled)
    return make_engine(cfg, model_name, model=model, tokenizer=tokenizer)


def summarise(name: str, s: dict[str, float], timer: PrefillTimer | None, ceiling: float) -> dict[str, Any]:
    """Rates of one run plus its prefill figures (HF only); printed at once, so a long run shows progress."""
    gen_rate = s["generated_tokens"] / s["seconds"]
    prompt_rate = s["prompt_tokens"] / s["seconds"]
    row = {"name": name, **s, "generated_per_s": gen_rate, "prompt_per_s": prompt_rate,
           "load_average": load_average()}
    prefill = ""
    if timer is not None:
        gflops = timer.flops / timer.seconds / 1e9 if timer.seconds else 0.0
        useful = timer.useful_flops / max(timer.flops, 1.0)
        prefill = (f"; prefill {timer.seconds:.1f} s in {timer.calls} calls at {gflops:.1f} GFLOP/s = "
                   f"{gflops / ceiling:.0%} of the ceiling ({useful:.0%} of those FLOPs on real tokens' "
                   "linear layers)")
        row.update(prefill_seconds=timer.seconds, prefill_calls=timer.calls, prefill_gflops=gflops,
                   prefill_fraction_of_ceiling=gflops / ceiling, prefill_useful_fraction=useful)
    print(f"{name:>26}: {s['conversations']:3d} conversations, {s['turns']:3d} turns, "
          f"{s['seconds']:7.1f} s ({s['cpu_seconds']:.0f} CPU-s), {s['generated_tokens']:6d} generated "
          f"({gen_rate:6.2f}/s), {s['prompt_tokens']:6d} prompt tokens ({prompt_rate:7.1f}/s){prefill}; "
          f"load average {load_average()}", flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--engines", default="hf-fp32",
                        help=f"comma-separated, run in this order on the same workload: {', '.join(ENGINES)}")
    parser.add_argument("--skip-alone", action="store_true", help="no one-conversation-at-a-time baseline")
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
    engines = args.engines.split(",")
    unknown = [e for e in engines if e not in ENGINES]
    if unknown:
        parser.error(f"--engines: unknown {', '.join(unknown)}; expected some of {', '.join(ENGINES)}")
    torch.set_num_threads(2)
    print(f"machine: {machine()}")
    ceiling = {torch.float32: matmul_ceiling()}
    print(f"fp32 matmul ceiling (2048^3, best of 5): {ceiling[torch.float32]:.1f} GFLOP/s")
    ceiling[torch.bfloat16] = ceilings()[torch.bfloat16]

    tokenizer = load_tokenizer(args.model)
    model = load_policy(args.model, dtype="float32", device="cpu")
    cfg = AgentConfig(chunk_tokens=args.chunk_tokens, memory_tokens=args.memory_tokens,
                      answer_tokens=args.answer_tokens, max_chunks=args.chunks)
    samples = [{"id": f"doc{i}", "context": make_document(tokenizer, args.chunks * args.chunk_tokens, i),
                "question": "Which building was built first?", "answers": ["x"]} for i in range(args.docs)]
    print(f"model {args.model} (fp32 weights), {args.docs} documents x {args.samples} samples, {args.chunks} "
          f"chunks of {args.chunk_tokens} tokens, memory cap {args.memory_tokens}, "
          f"answer cap {args.answer_tokens}, temperature 1.0; engines {', '.join(engines)}")
    timer = PrefillTimer(model)
    warm_up = GenerationRequest(tokenizer(samples[0]["context"])["input_ids"][:args.chunk_tokens],
                                SamplingParams(n=2, temperature=1.0, max_tokens=8, seed=args.seed))

    rows = []
    for spec in engines:
        engine = build_engine(spec, model, tokenizer, args.model)
        engine.generate([warm_up])
        agent = MemoryAgent(engine, tokenizer, cfg)
        assert all(len(agent.chunk(s).chunks) == args.chunks for s in samples)
        timer.reset()
        stats = run_agent(agent, samples, args.samples, args.seed)
        hf = spec.startswith("hf")
        rows.append(summarise(f"agent loop, {spec}", stats, timer if hf else None,
                              ceiling[DTYPES[spec.split("-")[1]]]))
        if not hf:
            engine.close()  # its memory back before the next engine
    if not args.skip_alone:
        set_compute_dtype(model, torch.float32)
        timer.reset()
        agent = MemoryAgent(HFEngine(model, tokenizer), tokenizer, cfg)
        limit = args.baseline_limit or args.docs * args.samples
        alone = run_alone(model, tokenizer, cfg, agent, samples, args.samples, limit, args.seed)
        rows.append(summarise("each alone (generate)", alone, timer, ceiling[torch.float32]))
    ratios = {}
    for a in rows:
        for b in rows:
            if a is not b and (b["name"].endswith("hf-fp32") or b["name"].endswith("hf-bf16")
                               or b["name"].startswith("each alone")):
                key = f"{a['name']} / {b['name']}"
                ratios[key] = a["generated_per_s"] / b["generated_per_s"]
                cpu = (a["generated_tokens"] / a["cpu_seconds"]) / (b["generated_tokens"] / b["cpu_seconds"])
                print(f"generated tok/s {key}: x{ratios[key]:.2f} (per CPU-second of this process: "
                      f"x{cpu:.2f}; prompt tok/s x{a['prompt_per_s'] / b['prompt_per_s']:.2f})")
    print(f"load average at the end: {load_average()}")
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump({"machine": machine(), "ceiling_gflops": ceiling[torch.float32], "rows": rows,
                       "ratios_generated": ratios, "args": vars(args)}, f, indent=2)


if __name__ == "__main__":
    main()
