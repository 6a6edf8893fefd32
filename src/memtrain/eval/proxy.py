"""``memtrain eval proxy``: any model or checkpoint on a proxy set - E2E reconstruction and IMR recall.

Per document (docs/method.md sections 2-3):

* E2E: one trajectory of the memory agent (the config's budgets and prompts, as in training, including
  ``agent.max_chunks``), scored against the masked entity with every metric. The memory prompts after step
  0 hold the model's own memories, so they differ between models: that is what is being measured.
* IMR: one question per trajectory (``imr_questions``: more, distinct ones; a document then scores the mean of
  its questions, and intervals still resample documents). Its (step k, chunk l, entity) is drawn from the DATA
  alone - the chunks and their entities, never the memories (:func:`memtrain.agent.imr.draw_imr_choice`) -
  with a ``random.Random`` seeded from (seed, document id) only. Two models that chunk a document the same way
  (same tokenizer and budgets) therefore get the same question and label for it, whatever their memories,
  batch sizes or resumes; the memory inside the prompt is the model's own ``m_k`` (what IMR measures). Unlike
  training (:func:`~memtrain.agent.imr.build_imr_prompt`), a step whose memory the model left empty stays
  eligible: such a question is not asked and scores 0 on every metric (``memory_empty`` in its record), so
  that both models are scored on the same questions and forgetting everything is not rewarded by skipping.
  A document with no usable entity in any chunk has no IMR question (for every model).

Decoding is greedy by default (a deterministic comparison); ``temperature > 0`` samples with per-batch seeds
derived from ``seed``. Documents are batched by their position in the set, and a batch with any missing
record is re-run whole, so a resumed run - even a sampled one - gives exactly the records of an
uninterrupted one. ``examples.jsonl`` grows batch by batch; ``summary.json`` holds the mean of every metric
with a percentile bootstrap 95% interval over documents (:mod:`memtrain.eval.stats`); ``memtrain report A
B`` (:func:`compare_proxy`) adds the paired difference B - A with its interval.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from memtrain.agent.imr import ImrChoice, ImrPrompt, draw_imr_choice, run_imr
from memtrain.agent.loop import MemoryAgent
from memtrain.agent.seeding import derive_seed
from memtrain.agent.types import Trajectory, Turn
from memtrain.config import AgentConfig, Config
from memtrain.engines.base import Engine, SamplingParams
from memtrain.errors import UserError
from memtrain.eval.registry import get_eval, register_eval
from memtrain.eval.report import (
    EXAMPLES,
    PLOT,
    SUMMARY,
    TABLE,
    check_decoding_args,
    load_summary,
    new_figure,
    save_figure,
)
from memtrain.eval.runner import EvalRun, Evaluator, Row, load_engine, run_eval
from memtrain.eval.stats import CONFIDENCE, RESAMPLES, bootstrap_ci, paired_difference_ci
from memtrain.io import atomic_write_json, atomic_write_text, read_jsonl
from memtrain.progress import Progress, estimate_turns
from memtrain.prompts import render, template
from memtrain.scoring import METRICS, REWARD_METRIC, answer_words, contains_answer, extract_answer, score

TASK = "proxy"
PARTS = ("e2e", "imr")
TEMPERATURE = 0.0  # greedy: two models are compared on their most likely outputs, run to run identical
TOP_P = 1.0
SEED = 0
BOOTSTRAP_SEED = 0
COLUMNS = ("id", "context", "question", "answers", "entity_spans")
_WEIGHTS = (".safetensors", ".bin", ".pt", ".json")


def imr_rng(seed: int, doc_id: str) -> random.Random:
    """The IMR draw's generator for one document: (seed, id) only, so batching and resumes cannot move it.

    A string seed is hashed with SHA-512 by ``random`` (not ``hash()``), so it is stable across processes.
    """
    return random.Random(f"memtrain-imr/{seed}/{doc_id}")


def model_identity(name: str) -> dict[str, Any]:
    """What the resume check compares for the model: the name, and for a local checkpoint directory its
    absolute path and a cheap content fingerprint of its weight / config files (size + first and last
    64 KiB), so a retrained checkpoint in the same place is never mixed with the old one's records."""
    path = Path(name).expanduser()
    if not path.is_dir():
        return {"name": name}
    digest = hashlib.blake2b(digest_size=12)
    for f in sorted(p for p in path.iterdir() if p.is_file() and p.name.endswith(_WEIGHTS)):
        size = f.stat().st_size
        with f.open("rb") as fh:
            head = fh.read(65536)
            fh.seek(max(size - 65536, 0))
            tail = fh.read(65536)
        digest.update(json.dumps([f.name, size]).encode() + head + tail)
    return {"name": name, "path": str(path.resolve()), "fingerprint": digest.hexdigest()}


def _imr_record(choice: ImrChoice, memory: str, memory_empty: bool, text: str | None,
                hit_cap: bool) -> dict[str, Any]:
    """``in_memory``: the label is in the memory the question is asked from - what the memory kept, apart
    from whether the answer then names it."""
    rec: dict[str, Any] = {"step_k": choice.step_k, "chunk_l": choice.chunk_l, "entity": choice.entity,
                           "label": choice.entity, "entity_label": choice.entity_label,
                           "memory_empty": memory_empty,
                           "in_memory": float(not memory_empty and contains_answer(memory, choice.entity))}
    if memory_empty or text is None:  # not asked: the memory holds nothing to recall from
        return {**rec, "prediction": None, "extracted": None, "metrics": dict.fromkeys(METRICS, 0.0),
                "hit_cap": False}
    return {**rec, "prediction": text, "extracted": extract_answer(text),
            "metrics": score(text, choice.entity), "hit_cap": hit_cap}


def draw_questions(traj: Trajectory, sample: Mapping[str, Any], rng: random.Random,
                   count: int) -> list[ImrChoice]:
    """Up to ``count`` distinct (k, l, entity) questions for one document, drawn one after the other from
    ``rng``: the first is the single question of ``count=1``, so adding questions never changes it."""
    out: list[ImrChoice] = []
    seen: set[tuple[int, int, str]] = set()
    for _ in range(4 * count):  # a few spare draws for repeats; a document may have fewer questions
        choice = draw_imr_choice(traj, sample, rng)
        if choice is None:
            break
        key = (choice.step_k, choice.chunk_l, choice.entity)
        if key not in seen:
            seen.add(key)
            out.append(choice)
            if len(out) == count:
                break
    return out


def questions_of(record: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The IMR questions of a record: ``imr`` (the first, or None) and ``imr_more`` (any others)."""
    first = record.get("imr")
    return ([] if first is None else [first]) + list(record.get("imr_more") or [])


def _batch_records(agent: MemoryAgent, engine: Engine, rows: list[dict[str, Any]], params: SamplingParams,
                   seed: int, questions: int = 1, progress: Progress | None = None) -> list[dict[str, Any]]:
    """E2E trajectory + ``questions`` IMR questions per document of one batch, as records."""
    cfg = agent.config
    samples = [{k: r[k] for k in COLUMNS} | {"answers": list(r["answers"])} for r in rows]
    if progress is not None:
        progress.batch([_turns(cfg, r) - 1 for r in rows])  # the agent's turns; IMR comes after
    trajs = agent.run(samples, params, n=1, on_turn=None if progress is None else progress.on_turn)
    initial = template("initial_memory", cfg.templates)
    question = template("imr_question", cfg.templates)
    choices: list[list[ImrChoice]] = []
    asked: list[tuple[tuple[int, int], ImrPrompt]] = []
    for i, (sample, traj) in enumerate(zip(samples, trajs, strict=True)):
        choices.append(draw_questions(traj, sample, imr_rng(seed, str(sample["id"])), questions))
        for q, choice in enumerate(choices[-1]):
            if traj.memories[choice.step_k] == initial:
                continue
            text, ids = render(agent.tokenizer, "imr", cfg.templates, problem=question,
                               memory=traj.memories[choice.step_k], chunk=choice.masked_chunk)
            asked.append(((i, q), ImrPrompt(trajectory_index=i, step_k=choice.step_k, chunk_l=choice.chunk_l,
                                            entity=choice.entity, label=choice.entity, prompt_ids=ids,
                                            prompt_text=text, entity_label=choice.entity_label)))
    answers = run_imr(engine, [p for _, p in asked], params, 1, cfg.answer_tokens)
    if progress is not None:  # the IMR questions are more turns (progress counted one per document)
        progress.total_turns += len(asked) - len(rows)
        progress.add(turns=len(answers), tokens=sum(len(t.completion_ids) for ts in answers for t in ts))
    imr_turns = {key: turns[0] for (key, _), turns in zip(asked, answers, strict=True)}
    return [_record(row, traj, choices[i], [imr_turns.get((i, q)) for q in range(len(choices[i]))], questions)
            for i, (row, traj) in enumerate(zip(rows, trajs, strict=True))]


def _turns(agent: AgentConfig, row: Mapping[str, Any]) -> int:
    """Estimated turns of one document: its memory-agent turns and the IMR question."""
    return estimate_turns(len(row["context"]), agent.chunk_tokens, agent.max_chunks) + 1


def _record(row: Mapping[str, Any], traj: Trajectory, choices: list[ImrChoice], turns: list[Turn | None],
            questions: int = 1) -> dict[str, Any]:
    imr = [_imr_record(c, traj.memories[c.step_k], t is None, None if t is None else t.text,
                       t is not None and t.hit_cap) for c, t in zip(choices, turns, strict=True)]
    more = {"imr_more": imr[1:]} if questions > 1 else {}  # records of one question stay as they were
    return {"key": str(row["id"]), "group": TASK, "id": str(row["id"]), "status": "ok",
            "question": row["question"], "gold": list(row["answers"]),
            "e2e": {"prediction": traj.answer, "extracted": extract_answer(traj.answer),
                    "metrics": traj.scores, "hit_cap": traj.final_turn.hit_cap},
            "imr": imr[0] if imr else None, **more, "memories": traj.memories,
            "empty_memories": list(traj.empty_memories),
            "num_chunks": len(traj.chunks), "truncated": traj.truncated,
            "num_doc_tokens": traj.num_doc_tokens,
            "memory_cap_hits": sum(t.hit_cap for t in traj.memory_turns)}


def _intervals(values: Sequence[float], seed: int = BOOTSTRAP_SEED) -> dict[str, Any]:
    return bootstrap_ci(values, CONFIDENCE, RESAMPLES, seed).to_dict()


def summarize_proxy(records: Sequence[Mapping[str, Any]], meta: Mapping[str, Any]) -> dict[str, Any]:
    """Means of every E2E and IMR metric with bootstrap intervals, plus counts and budget hit-rates.

    ``groups`` / ``order`` mirror the other evals' summaries (``load_summary`` reads any of them).
    """
    n = len(records)
    docs = {str(r["id"]): r for r in records}
    with_imr = [q for r in records for q in questions_of(r)]
    e2e = {m: _intervals([float(r["e2e"]["metrics"][m]) for r in records]) for m in METRICS} if n else None
    imr_scores = {m: _part_scores(docs, "imr", m) for m in METRICS}
    imr_docs = imr_scores[METRICS[0]]  # the documents with a question
    imr = {m: _intervals(list(v.values())) for m, v in imr_scores.items()} if imr_docs else None
    imr_words = list(_answer_words(docs, "imr").values())
    words = {"e2e": _intervals([answer_words(r["e2e"]["prediction"]) for r in records]) if n else None,
             "imr": _intervals(imr_words) if imr_words else None}
    kept = [q.get("in_memory") for q in with_imr]  # absent in records of older versions
    in_memory = (_intervals(list(_in_memory_scores(docs).values())) if kept and None not in kept else None)
    memory_turns = sum(r["num_chunks"] for r in records)
    groups = {part: {"n": count, "too_long": 0, "metrics": None if ci is None else
                     {m: ci[m]["mean"] for m in METRICS}}
              for part, count, ci in (("e2e", n, e2e), ("imr", len(imr_docs), imr))}
    return {"task": TASK, **dict(meta), "n": n, "ids": [r["id"] for r in records],
            "e2e": {"n": n, "metrics": e2e, "answer_words": words["e2e"]},
            "imr": {"n": len(imr_docs), "questions": len(with_imr), "no_question": n - len(imr_docs),
                    "memory_empty": sum(bool(q["memory_empty"]) for q in with_imr), "metrics": imr,
                    "in_memory": in_memory, "answer_words": words["imr"]},
            "num_chunks": memory_turns / n if n else 0.0,
            "truncated": sum(bool(r["truncated"]) for r in records) / n if n else 0.0,
            "memory_cap_rate": sum(r["memory_cap_hits"] for r in records) / max(memory_turns, 1),
            "answer_cap_rate": sum(bool(r["e2e"]["hit_cap"]) for r in records) / max(n, 1),
            "bootstrap": {"method": "percentile, documents resampled", "confidence": CONFIDENCE,
                          "resamples": RESAMPLES, "seed": BOOTSTRAP_SEED},
            "groups": groups, "order": list(PARTS), "average": None, "average_over": [],
            "reward_metric": REWARD_METRIC, "main_metric": get_eval(TASK).main_metric}


def _pct(x: float) -> str:
    return f"{100 * x:.2f}"


def _words(ci: Mapping[str, Any] | None, signed: bool = False) -> str:
    """Answer length in words with its interval: next to every metric, so a gain bought with length (or
    with a collapse to nothing) shows."""
    if ci is None:
        return "-"
    mean = f"{ci['mean']:+.1f}" if signed else f"{ci['mean']:.1f}"
    return f"{mean} [{ci['lo']:.1f}, {ci['hi']:.1f}]"


def _ci(ci: Mapping[str, Any] | None, signed: bool = False) -> str:
    if ci is None:
        return "-"
    mean = f"{100 * ci['mean']:+.2f}" if signed else _pct(ci["mean"])
    return f"{mean} [{100 * ci['lo']:.2f}, {100 * ci['hi']:.2f}]"


def markdown_table(summary: Mapping[str, Any]) -> str:
    """E2E and IMR rows, every metric in % with its 95% interval, and the counts that qualify them."""
    lines = [f"# proxy: {summary.get('model', '?')}", ""]
    if summary.get("protocol"):
        lines += ["Protocol: " + ", ".join(f"{k} `{'none' if v is None else v}`"
                                           for k, v in summary["protocol"].items()), ""]
    conf = round(100 * summary["bootstrap"]["confidence"])
    lines += [f"Metrics in % with bootstrap {conf}% intervals over documents; "
              f"`{summary['reward_metric']}` is the training reward.", "",
              "| task | n | " + " | ".join(METRICS) + " | answer words |", "|" + "---|" * (len(METRICS) + 3)]
    for part in PARTS:
        block = summary[part]
        cells = [_ci(block["metrics"][m] if block["metrics"] else None) for m in METRICS]
        cells.append(_words(block.get("answer_words")))
        lines.append(f"| {part.upper()} | {block['n']} | " + " | ".join(cells) + " |")
    imr = summary["imr"]
    asked = imr.get("questions", imr["n"])
    lines += ["", f"IMR: {asked} questions on {imr['n']} documents, drawn from the data alone (a document "
              f"scores the mean of its questions); {imr['no_question']} of {summary['n']} documents have no "
              f"usable entity (no question); {imr['memory_empty']} questions hit an empty memory, scored 0.",
              f"IMR label kept in the memory it is asked from (the sub-EM test on the memory): "
              f"{_ci(imr.get('in_memory'))}%.",
              f"Chunks per document {summary['num_chunks']:.2f}, truncated {_pct(summary['truncated'])}%, "
              f"memory cap hit-rate {_pct(summary['memory_cap_rate'])}%, answer cap hit-rate "
              f"{_pct(summary['answer_cap_rate'])}%."]
    return "\n".join(lines) + "\n"


def plot(summary: Mapping[str, Any], path: Path) -> Path:
    """Bars per metric, E2E and IMR side by side, with the 95% intervals as error bars."""
    fig, ax = new_figure()
    width = 0.4
    for i, part in enumerate(PARTS):
        block = summary[part]["metrics"]
        if block is None:
            continue
        means = [100 * block[m]["mean"] for m in METRICS]
        err = [[100 * (block[m]["mean"] - block[m]["lo"]) for m in METRICS],
               [100 * (block[m]["hi"] - block[m]["mean"]) for m in METRICS]]
        ax.bar([j + i * width for j in range(len(METRICS))], means, width, yerr=err, capsize=3,
               label=f"{part.upper()} (n={summary[part]['n']})")
    ax.set_xticks([j + width / 2 for j in range(len(METRICS))], list(METRICS))
    ax.set_title(f"proxy: {summary.get('model', '?')}")
    ax.grid(alpha=0.3, axis="y")
    return save_figure(fig, ax, path)


def _protocol(cfg: Config, temperature: float, top_p: float, seed: int, batch_size: int,
              questions: int) -> dict[str, Any]:
    """What makes two proxy evaluations comparable (the resume check refuses a run that differs)."""
    from memtrain.precision import compute_dtype_name  # torch: only when evaluating

    a, sampled = cfg.agent, temperature > 0
    return {
        "decoding": "sampled" if sampled else "greedy", "temperature": temperature, "top_p": top_p,
        "seed": seed, "samples": 1, "imr_draw": "data-only (seed, id); empty memory scores 0",
        "chunk_tokens": a.chunk_tokens, "memory_tokens": a.memory_tokens, "answer_tokens": a.answer_tokens,
        "instruction_tokens": a.instruction_tokens, "max_chunks": a.max_chunks, "truncation": a.truncation,
        # sampled seeds derive from a document's place in its batch: the batch size must not change
        "batch_size": batch_size if sampled else None,
        "compute_dtype": compute_dtype_name(cfg.model.compute_dtype, cfg.model.device),
        **({"imr_questions": questions} if questions > 1 else {})}  # one question: as runs before it


def run_proxy_eval(cfg: Config, data_dir: str | Path, out_dir: str | Path, limit: int | None = None,
                   batch_size: int = 16, temperature: float = TEMPERATURE, top_p: float = TOP_P,
                   seed: int = SEED, engine: Engine | None = None, tokenizer: Any = None,
                   model_id: Mapping[str, Any] | None = None, imr_questions: int | None = None
                   ) -> dict[str, Any]:
    """Evaluate ``cfg.model`` on the proxy set in ``data_dir`` (first ``limit`` documents); returns the
    summary it writes to ``out_dir``.

    ``engine`` / ``tokenizer``: used instead of loading ``cfg.model`` (the trainer's validation passes its
    engine, synced to the policy, and a ``model_id`` naming the run and step for the resume check).

    ``limit`` is not part of the resume check: a run can be extended to more documents in the same
    directory, and its summary covers the first ``limit`` documents of the set. ``imr_questions``: IMR
    questions per document (default ``train.eval_imr_questions``, 1).
    """
    from memtrain.data.dataset import load_rows, require_columns  # pyarrow: only when evaluating

    check_decoding_args(limit, batch_size, temperature, top_p, unit="documents")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise UserError(f"--seed {seed!r}: expected an integer (it also seeds the IMR question draw)")
    out = Path(out_dir)
    require_columns(data_dir, COLUMNS, TASK)
    rows = load_rows(data_dir)[:limit]
    a = cfg.agent
    questions = cfg.train.eval_imr_questions if imr_questions is None else imr_questions
    if not isinstance(questions, int) or isinstance(questions, bool) or questions < 1:
        raise UserError(f"--imr-questions {questions!r}: expected an integer >= 1")
    protocol = _protocol(cfg, temperature, top_p, seed, batch_size, questions)
    identity = dict(model_id) if model_id is not None else model_identity(cfg.model.name)
    meta: dict[str, Any] = {"task": TASK, "model": cfg.model.name, "model_id": identity,
                            "data": str(Path(data_dir).resolve()), "engine": cfg.engine.kind,
                            "templates": dict(a.templates), "protocol": protocol}
    def start() -> Evaluator:
        nonlocal engine, tokenizer
        engine, tokenizer = load_engine(cfg, engine, tokenizer)
        agent = MemoryAgent(engine, tokenizer, a)
        agent.check_imr_budget()  # every document gets an IMR question

        def batch(group: str, b: int, batch_rows: list[Row], progress: Progress) -> list[dict[str, Any]]:
            params = SamplingParams(temperature=temperature, top_p=top_p, seed=derive_seed(seed, b))
            return _batch_records(agent, engine, batch_rows, params, seed, questions, progress)

        return Evaluator(batch)

    def summarize(records: list[dict[str, Any]]) -> dict[str, Any]:
        summary = summarize_proxy(records, {**meta, "limit": limit})
        atomic_write_json(out / SUMMARY, summary)
        atomic_write_text(out / TABLE, markdown_table(summary))
        plot(summary, out / PLOT)
        return summary

    return run_eval(EvalRun("proxy eval", out, meta, {TASK: rows}, batch_size, start, summarize,
                            key=lambda group, row: str(row["id"]), turns=lambda row: _turns(a, row)))


def _arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--temperature", type=float, default=TEMPERATURE, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=TOP_P, help="nucleus sampling with --temperature > 0")
    p.add_argument("--imr-questions", type=int, default=None,
                   help="IMR questions per document (default: train.eval_imr_questions of the config, 1)")
    p.add_argument("--seed", type=int, default=SEED,
                   help="seeds the IMR question draw and sampling (default 0; keep it equal across models)")


@register_eval(TASK, help="E2E reconstruction and IMR recall on a proxy set (95%% intervals)",
               description="One E2E trajectory and one IMR question (--imr-questions: more) per document; "
               "the IMR questions are drawn from the data alone with a seed per document, so two models get "
               "the same questions. Compare runs with `memtrain report A B`.", main_metric=REWARD_METRIC,
               arguments=_arguments,
               validate=run_proxy_eval)
def proxy_command(cfg: Config, args: argparse.Namespace) -> dict[str, Any]:
    """``memtrain eval proxy``."""
    return run_proxy_eval(cfg, args.data, args.out, limit=args.limit, batch_size=args.batch_size,
                          temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                          imr_questions=args.imr_questions)


# ---------------------------------------------------------------------------------------------------------
# memtrain report A B
# ---------------------------------------------------------------------------------------------------------

def _per_doc(run: Path, summary: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The records a proxy summary covers, by document id."""
    path = Path(run) / EXAMPLES
    if not path.is_file():
        raise FileNotFoundError(f"{run}: no {EXAMPLES}; the paired difference needs the per-document records")
    by_id = {str(r["id"]): r for r in read_jsonl(path)}
    missing = [i for i in summary["ids"] if i not in by_id]
    if missing:
        raise UserError(f"{run}: {len(missing)} documents of {SUMMARY} have no record in {EXAMPLES} "
                        f"(first: {missing[0]!r}); re-run `memtrain eval proxy --out {run}`")
    return {i: by_id[i] for i in summary["ids"]}


def compare_proxy(runs: Sequence[str | Path], labels: Sequence[str], metric: str | None = None) -> str:
    """Proxy runs side by side (E2E and IMR, every metric with its interval), then each run minus the first
    with a paired bootstrap interval over the documents both runs evaluated (matched by id)."""
    if len(runs) != len(labels):
        raise UserError(f"--labels: {len(labels)} labels for {len(runs)} runs")
    if metric is not None and metric not in METRICS:
        raise UserError(f"--metric {metric!r}: expected one of {', '.join(METRICS)}")
    metrics = [metric] if metric else list(METRICS)
    summaries = [load_summary(r) for r in runs]
    for r, s in zip(runs, summaries, strict=True):
        if s["task"] != TASK:
            raise UserError(f"memtrain report: {r} is a {s['task']} run; it cannot share a table with "
                            "proxy runs")
    docs = [_per_doc(Path(r), s) for r, s in zip(runs, summaries, strict=True)]
    base, base_label = docs[0], labels[0]
    head = ["metric", *(f"{lab} (n={s['n']})" for lab, s in zip(labels, summaries, strict=True)),
            *(f"{lab} - {base_label}" for lab in labels[1:])]
    conf = round(100 * CONFIDENCE)
    lines = [f"proxy: metrics in % with bootstrap {conf}% intervals; differences paired over the documents "
             "both runs evaluated (matched by id)", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    notes: list[str] = []
    for part in PARTS:
        for m in metrics:
            cis = [s[part]["metrics"][m] if s[part]["metrics"] else None for s in summaries]
            lines.append(_row(f"{part.upper()} {m}", cis, [_part_scores(d, part, m) for d in docs]))
        words = [_answer_words(d, part) for d in docs]
        cells = [_words(s[part].get("answer_words")) for s in summaries]
        cells += [_words(_paired_ci(words[0], other), signed=True) for other in words[1:]]
        lines.append(f"| {part.upper()} answer words | " + " | ".join(cells) + " |")
    lines.append(_row("IMR label in memory", [s["imr"].get("in_memory") for s in summaries],
                      [_in_memory_scores(d) for d in docs]))
    for lab, other, s in zip(labels[1:], docs[1:], summaries[1:], strict=True):
        notes.append(_matching_note(base_label, lab, base, other))
        diff = _differences(summaries[0], s)
        if diff:
            notes.append(f"**WARNING ({lab} vs {base_label})**: evaluated differently: {'; '.join(diff)}")
    return "\n".join([*lines, "", *notes]) + "\n"


def _row(label: str, cis: Sequence[Mapping[str, Any] | None], scores: Sequence[Mapping[str, float]]) -> str:
    """One table row: each run's mean with its interval, then each run minus the first, paired by id."""
    cells = [_ci(ci) for ci in cis] + [_paired(scores[0], other) for other in scores[1:]]
    return f"| {label} | " + " | ".join(cells) + " |"


def document_scores(run: str | Path, part: str, metric: str, rescore: bool = False) -> dict[str, float]:
    """Per document id: one number of a proxy eval run - ``metric`` of ``part`` (e2e / imr), or
    ``answer_words`` of that part, or the IMR ``in_memory`` rate - what paired and pooled differences pair.
    ``rescore``: grade the stored predictions with today's ``memtrain.scoring`` instead of reading the
    scores the run recorded (a scorer fix then applies to runs made before it)."""
    docs = _per_doc(Path(run), load_summary(run))
    if metric == "in_memory":
        return _in_memory_scores(docs)
    if metric == "answer_words":
        return _answer_words(docs, part)
    if not rescore:
        return _part_scores(docs, part, metric)
    out = {}
    for i, r in docs.items():
        values = [0.0 if b["prediction"] is None else
                  float(score(b["prediction"], b["label"] if part == "imr" else r["gold"])[metric])
                  for b in _blocks(r, part)]
        if values:
            out[i] = sum(values) / len(values)
    return out


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def _in_memory_scores(docs: Mapping[str, Mapping[str, Any]]) -> dict[str, float]:
    """Per document: how often the IMR label was in the memory asked from (older records lack it)."""
    out = {}
    for i, r in docs.items():
        kept = [float(q["in_memory"]) for q in questions_of(r) if "in_memory" in q]
        if kept:
            out[i] = _mean(kept)
    return out


def _paired_ci(a: Mapping[str, float], b: Mapping[str, float]) -> dict[str, Any] | None:
    """b - a paired over their common ids with its interval (None when they have none in common)."""
    try:
        return paired_difference_ci(a, b, CONFIDENCE, RESAMPLES, BOOTSTRAP_SEED).to_dict()
    except ValueError:
        return None


def _paired(a: Mapping[str, float], b: Mapping[str, float]) -> str:
    """b - a paired over their common ids, with its interval ("-" when they have none in common)."""
    return _ci(_paired_ci(a, b), signed=True)


def _blocks(record: Mapping[str, Any], part: str) -> list[Mapping[str, Any]]:
    return questions_of(record) if part == "imr" else [record[part]]


def _answer_words(docs: Mapping[str, Mapping[str, Any]], part: str) -> dict[str, float]:
    """Per document: words of the part's answer (IMR: the mean over the questions asked)."""
    out = {}
    for i, r in docs.items():
        words = [float(answer_words(b["prediction"])) for b in _blocks(r, part)
                 if b.get("prediction") is not None]
        if words:
            out[i] = _mean(words)
    return out


def _part_scores(docs: Mapping[str, Mapping[str, Any]], part: str, metric: str) -> dict[str, float]:
    """Per document: ``metric`` of the part (IMR: the mean over its questions)."""
    out = {}
    for i, r in docs.items():
        blocks = _blocks(r, part)
        if blocks:
            out[i] = _mean([float(b["metrics"][metric]) for b in blocks])
    return out


def _matching_note(label_a: str, label_b: str, a: Mapping[str, Mapping[str, Any]],
                   b: Mapping[str, Mapping[str, Any]]) -> str:
    """How many documents / IMR questions the paired difference of two runs is over."""
    common = sorted(set(a) & set(b))
    both_imr = [i for i in common if questions_of(a[i]) and questions_of(b[i])]

    def asked(record: Mapping[str, Any]) -> list[tuple[Any, ...]]:
        return [(q["step_k"], q["chunk_l"], q["entity"]) for q in questions_of(record)]

    same = sum(asked(a[i]) == asked(b[i]) for i in both_imr)
    return (f"{label_b} - {label_a}: E2E paired over {len(common)} matched documents ({len(a)} in "
            f"{label_a}, {len(b)} in {label_b}); IMR over {len(both_imr)} documents with a question in both, "
            f"{same} of them the same questions (k, l, entity).")


def _differences(a: Mapping[str, Any], b: Mapping[str, Any]) -> list[str]:
    """Settings that make two proxy runs not directly comparable (data, protocol, templates)."""
    out = []
    for key in ("data", "templates"):
        if a.get(key) != b.get(key):
            out.append(f"{key} differs")
    pa, pb = a.get("protocol") or {}, b.get("protocol") or {}
    out += [f"protocol.{k}: {pa.get(k)!r} vs {pb.get(k)!r}" for k in sorted(set(pa) | set(pb))
            if k != "batch_size" and pa.get(k) != pb.get(k)]
    return out
