"""HFEngine throughput against transformers' ``model.generate`` on the same sampled batch.

Both sample the same batch (chat prompts of different lengths, ``n`` samples each, left padding, KV cache)
and return the sampled tokens' raw-logit log-probs (for ``generate``: ``output_logits=True`` then a
log-softmax). Reports generated tokens per second and the wall time of each, in one run.

    python benchmarks/bench_engine.py [--model smollm2-135m] [--prompts 8] [--n 2] [--max-tokens 32]
"""

from __future__ import annotations

import argparse
import time

import torch

from _machine import machine
from memtrain.engines.base import GenerationRequest, SamplingParams
from memtrain.engines.hf import HFEngine
from memtrain.models import load_policy, load_tokenizer

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
    args = parser.parse_args()
    torch.set_num_threads(2)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"machine: {machine()}, device {device}")
    tokenizer = load_tokenizer(args.model)
    model = load_policy(args.model, device=device)
    batch = prompts(tokenizer, args.prompts)
    print(f"model {args.model} ({next(model.parameters()).dtype}), {args.prompts} prompts of "
          f"{min(map(len, batch))}..{max(map(len, batch))} tokens, n={args.n}, max_tokens={args.max_tokens}, "
          "temperature 1.0")
    engine = HFEngine(model, tokenizer)
    run_engine(engine, batch[:1], 1, 4)  # warm-up
    runs = (("HFEngine", lambda: run_engine(engine, batch, args.n, args.max_tokens)),
            ("model.generate", lambda: run_generate(model, tokenizer, batch, args.n, args.max_tokens)))
    for name, fn in runs:
        best = min((fn() for _ in range(args.repeats)), key=lambda r: r[0])
        print(f"{name:>15}: {best[0]:6.2f} s, {best[1]} tokens, {best[1] / best[0]:7.1f} generated tokens/s")


if __name__ == "__main__":
    main()
