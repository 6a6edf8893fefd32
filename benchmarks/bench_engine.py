"""HFEngine throughput against transformers' ``model.generate`` on the same sampled batch.

Both sample the same batch (chat prompts of different lengths, ``n`` samples each, left padding, KV cache)
and return the sampled tokens' log-probs (at the benchmark's temperature 1 those of the raw logits; for
``generate``: ``output_logits=True`` then a log-softmax). Reports generated tokens per second and the wall
time of each, in one run. Then, per compute dtype (``model.compute_dtype``: fp32, and bf16 autocast over the
same fp32 weights with a bf16 KV cache), the engine's prefill alone (``--prefill-rows`` x ``--prefill-len``
random tokens, as a % of that dtype's matmul ceiling measured in the same run) and its decoding (generated
tokens/s of the sampled batch), with the bf16 / fp32 ratios.

    python benchmarks/bench_engine.py [--model smollm2-135m] [--prompts 8] [--n 2] [--max-tokens 32]
                                      [--compute-dtypes float32,bfloat16] [--prefill-rows 4]
                                      [--prefill-len 512]
"""

from __future__ import annotations

import argparse
import time

import torch

from _machine import ceilings, dtype_name, forward_flops, machine
from memtrain.engines.base import GenerationRequest, SamplingParams
from memtrain.engines.hf import HFEngine
from memtrain.models import load_policy, load_tokenizer
from memtrain.precision import autocast_for, resolve_compute_dtype, set_compute_dtype

SENTENCE = "The memory agent reads a long document chunk by chunk and keeps a short memory. "


def prompts(tokenizer: object, count: int) -> list[list[int]]:
    """Chat prompts of 1..count sentences: varied lengths, as in a real rollout batch."""
    out = []
    for i in range(count):
        text = tokenizer.apply_chat_template(  # type: ignore[attr-defined]
            [{"role": "user", "content": SENTENCE * (1 + i) + "Summarise it."}],
            add_generation_prompt=True, tokenize=False)
        out.append(tokenizer(text, add_special_tokens=False)["input_ids"])  # type: ignore[operator]
    return out


def run_engine(engine: HFEngine, batch: list[list[int]], n: int, max_tokens: int) -> tuple[float, int]:
    params = SamplingParams(n=n, temperature=1.0, top_p=1.0, max_tokens=max_tokens, seed=0)
    start = time.perf_counter()
    results = engine.generate([GenerationRequest(ids, params) for ids in batch])
    elapsed = time.perf_counter() - start
    return elapsed, sum(len(c.token_ids) for cs in results for c in cs)


def run_generate(model: object, tokenizer: object, batch: list[list[int]], n: int,
                 max_tokens: int) -> tuple[float, int]:
    pad = tokenizer.pad_token_id  # type: ignore[attr-defined]
    width = max(len(p) for p in batch)
    input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in batch])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(  # type: ignore[attr-defined]
            input_ids=input_ids, attention_mask=mask, do_sample=True, temperature=1.0, top_p=1.0, top_k=0,
            max_new_tokens=max_tokens, num_return_sequences=n, output_logits=True,
            return_dict_in_generate=True, pad_token_id=pad)
        new = out.sequences[:, width:]
        logits = torch.stack(out.logits, dim=1).float()
        logp = torch.log_softmax(logits, dim=-1).gather(2, new[..., None]).squeeze(2)
        eos = set(model.generation_config.eos_token_id if isinstance(  # type: ignore[attr-defined]
            model.generation_config.eos_token_id, list) else [model.generation_config.eos_token_id])  # type: ignore[attr-defined]
        tokens = 0
        for row in new.tolist():  # count up to and including the first EOS, like the engine
            tokens += next((k + 1 for k, t in enumerate(row) if t in eos), len(row))
    elapsed = time.perf_counter() - start
    assert logp.shape == new.shape
    return elapsed, tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--n", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--compute-dtypes", default="float32,bfloat16")
    parser.add_argument("--prefill-rows", type=int, default=4)
    parser.add_argument("--prefill-len", type=int, default=512)
    parser.add_argument("--skip-generate", action="store_true", help="skip the model.generate comparison")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"machine: {machine()}, device {device}")
    ceiling = ceilings(device)
    tokenizer = load_tokenizer(args.model)
    model = load_policy(args.model, device=device)
    batch = prompts(tokenizer, args.prompts)
    print(f"model {args.model} ({next(model.parameters()).dtype}), {args.prompts} prompts of "
          f"{min(map(len, batch))}..{max(map(len, batch))} tokens, n={args.n}, max_tokens={args.max_tokens}, "
          "temperature 1.0")
    engine = HFEngine(model, tokenizer)
    run_engine(engine, batch[:1], 1, 4)  # warm-up
    runs = [("HFEngine", lambda: run_engine(engine, batch, args.n, args.max_tokens))]
    if not args.skip_generate:
        runs.append(("model.generate",
                     lambda: run_generate(model, tokenizer, batch, args.n, args.max_tokens)))
    for name, fn in runs:
        best = min((fn() for _ in range(args.repeats)), key=lambda r: r[0])
        print(f"{name:>15}: {best[0]:6.2f} s, {best[1]} tokens, {best[1] / best[0]:7.1f} generated tokens/s")

    gen = torch.Generator().manual_seed(0)
    long = [torch.randint(100, model.config.vocab_size, (args.prefill_len,), generator=gen).tolist()
            for _ in range(args.prefill_rows)]
    flops = forward_flops(model, [args.prefill_len] * args.prefill_rows, args.prefill_rows)
    speed: dict[torch.dtype, tuple[float, float]] = {}
    for dtype in (resolve_compute_dtype(d, device) for d in args.compute_dtypes.split(",")):
        set_compute_dtype(model, dtype)
        run_engine(engine, batch[:1], 1, 4)  # warm-up in this dtype
        prefill = float("inf")
        for _ in range(max(args.repeats, 2)):
            with torch.no_grad(), autocast_for(model):
                start = time.perf_counter()
                engine._prefill(long)
                prefill = min(prefill, time.perf_counter() - start)
        elapsed, tokens = min((run_engine(engine, batch, args.n, args.max_tokens)
                               for _ in range(args.repeats)), key=lambda r: r[0])
        speed[dtype] = (prefill, elapsed / tokens)
        name, gflops = dtype_name(dtype), flops / prefill / 1e9
        print(f"{name}: prefill {args.prefill_rows} x {args.prefill_len} tokens {prefill:6.2f} s "
              f"({args.prefill_rows * args.prefill_len / prefill:7.1f} tok/s, {gflops:5.0f} "
              f"GFLOP/s = {gflops / ceiling[dtype]:4.0%} of the {name} ceiling) | "
              f"HFEngine sampled batch {elapsed:6.2f} s, {tokens / elapsed:7.1f} generated tok/s", flush=True)
    if torch.float32 in speed and torch.bfloat16 in speed:
        (p32, d32), (p16, d16) = speed[torch.float32], speed[torch.bfloat16]
        print(f"bf16 / fp32 speed-up (same run): prefill x{p32 / p16:.2f}, generation x{d32 / d16:.2f}")


if __name__ == "__main__":
    main()
