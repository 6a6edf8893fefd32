"""How much GRPO signal does a model get from IMR on a proxy set, before any training?

GRPO learns only from groups whose rewards differ (the DAPO filter drops the others). This measures, for the
base model, the IMR answers that the trainer would sample: the memories come from one greedy agent pass over
``--docs`` documents (``--config`` budgets), the IMR question of each document is drawn as `memtrain eval
proxy` draws it, and ``--group-size`` answers are sampled per question at each ``--temperatures`` for each
answer template:

* ``default``: the config's IMR template (``agent.templates.imr``, else the shipped one in prompts.py);
* ``entity-only``: the same, asking for the entity only;
* ``boxed-prefix``: the shipped template with the answer opened for the model ("The answer is \\boxed{" at
  the start of the assistant turn, stopping at "}"), scored as a boxed answer.

Printed per (temperature, template): mean F1 and sub-EM of the answers, the share that boxes an answer, the
answer length, and the number of questions whose group has any reward variance under F1 (the groups that
would train). Also: the share of questions whose label is anywhere in the memory they are asked from (an
upper bound for recall from memory).

    python benchmarks/bench_signal.py --data runs/memtrain-demo-data-heldout
        [--config configs/memtrain_demo_cpu.yaml] [--docs 32] [--group-size 8] [--temperatures 0.8,1.0]
        [KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import time
from statistics import mean

from _machine import machine
from memtrain.agent.imr import draw_imr_choice
from memtrain.agent.loop import MemoryAgent
from memtrain.config import load_config
from memtrain.data.dataset import load_rows
from memtrain.engines.base import GenerationRequest, SamplingParams
from memtrain.eval.proxy import COLUMNS, imr_rng
from memtrain.eval.runner import load_engine
from memtrain.prompts import chat_text, encode_prompt, fill, template
from memtrain.scoring import contains_answer, score

ASK = "Give the final answer inside \\boxed{}, for example \\boxed{Paris}."
ENTITY_ONLY = ("Which entity does [TARGET] stand for? Reply with the entity only, inside \\boxed{}, for "
               "example \\boxed{Paris}.")


QUESTION_LAST = """Your memory of the document you are reading:
{memory}

A section of the document:
{chunk}

{problem} Reply with the entity only, inside \\boxed{}."""


def variants(shipped: str) -> dict[str, tuple[str, str]]:
    """(template, opening of the answer) per variant of the config's IMR template."""
    return {"default": (shipped, ""), "entity-only": (shipped.replace(ASK, ENTITY_ONLY), ""),
            "boxed-prefix": (shipped, "The answer is \\boxed{"), "question-last": (QUESTION_LAST, "")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="a proxy set (`memtrain data proxy`)")
    p.add_argument("--config", default="configs/memtrain_demo_cpu.yaml")
    p.add_argument("--docs", type=int, default=32)
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--temperatures", default="0.8,1.0")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    args = p.parse_args()
    cfg = load_config(args.config, args.overrides)
    print(f"machine: {machine()}", flush=True)
    engine, tok = load_engine(cfg)  # as `memtrain eval proxy` builds it (model.dtype, model.compute_dtype)
    rows = load_rows(args.data)[: args.docs]
    samples = [{k: r[k] for k in COLUMNS} | {"answers": list(r["answers"])} for r in rows]
    start = time.perf_counter()
    trajs = MemoryAgent(engine, tok, cfg.agent).run(samples, SamplingParams(temperature=0.0), n=1)
    print(f"greedy memories of {len(rows)} documents: {time.perf_counter() - start:.0f} s")
    initial = template("initial_memory", cfg.agent.templates)
    asked = [(c, t) for s, t in zip(samples, trajs, strict=True)  # as the eval: never from an empty memory
             if (c := draw_imr_choice(t, s, imr_rng(0, str(s["id"])))) is not None
             and t.memories[c.step_k] != initial]
    if not asked:
        raise SystemExit("no IMR question: no document has a usable entity in a chunk read before a memory")
    in_memory = sum(contains_answer(t.memories[c.step_k], c.entity) for c, t in asked)
    print(f"IMR questions {len(asked)}; label in the memory asked from (sub-EM test): {in_memory}")
    question = template("imr_question", cfg.agent.templates)
    shipped = template("imr", cfg.agent.templates)
    print("\n| T | template | F1 % | sub-EM % | span F1 % | span EM % | boxed % | answer tokens "
          "| groups with reward variance (F1) | (span F1) |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for temperature in (float(t) for t in args.temperatures.split(",")):
        for name, (text, prefix) in variants(shipped).items():
            stop = ("}",) if prefix else ()
            params = SamplingParams(temperature=temperature, n=args.group_size, seed=1,
                                    max_tokens=cfg.agent.answer_tokens, stop=stop)
            requests = [GenerationRequest(prompt_ids=encode_prompt(tok, chat_text(tok, fill(
                "imr", {"imr": text}, problem=question, memory=t.memories[c.step_k], chunk=c.masked_chunk))
                + prefix), params=params) for c, t in asked]
            outputs = engine.generate(requests)
            answers = [[prefix + o.text + ("}" if prefix else "") for o in out] for out in outputs]
            labels = [c.entity for c, _ in asked]
            scores = [[score(a, label) for a in group] for group, label in zip(answers, labels, strict=True)]
            f1 = [[s["f1"] for s in group] for group in scores]
            span = [[s["span_f1"] for s in group] for group in scores]
            print(f"| {temperature} | {name} | {100 * mean(map(mean, f1)):.1f} | "
                  f"{100 * mean(s['sub_em'] for g in scores for s in g):.1f} | "
                  f"{100 * mean(map(mean, span)):.1f} | "
                  f"{100 * mean(s['span_em'] for g in scores for s in g):.1f} | "
                  f"{100 * mean('boxed' in a for g in answers for a in g):.0f} | "
                  f"{mean(len(o.token_ids) for out in outputs for o in out):.1f} | "
                  f"{sum(len(set(g)) > 1 for g in f1)}/{len(f1)} | "
                  f"{sum(len(set(g)) > 1 for g in span)}/{len(span)} |", flush=True)


if __name__ == "__main__":
    main()
