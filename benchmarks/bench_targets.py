"""How clean are a proxy data set's targets? Broken NER spans, leaks and header-number targets, for the E2E
answers and for the pool IMR draws its targets from (#22).

    python benchmarks/bench_targets.py --data runs/targets-after
    python benchmarks/bench_targets.py --data runs/targets-before \
        --masker-from OLD/src/memtrain/data/entities.py

Every figure uses the *current* rule set: ``span_problem`` (the broken-span rules the tests define),
``names_a_header`` and the leak check of ``memtrain.data.leaks`` (independent of the masker). What is
measured:

- E2E: the answer of each row - broken? a header number? does a form of it survive in the document?
- IMR: per passage of each document, every entity the masker (``--masker-from``: an older
  ``memtrain/data/entities.py``, from before masking.py was split off it; default the current one) accepts
  as an IMR target under the rules of ``memtrain.agent.imr`` (candidate filters, at most 10 masks, no leak
  by the masker's own check): broken? a header number? does a form survive the masking? (Passages stand in
  for chunks: a chunk of the demo is a passage or part of one.)
"""

from __future__ import annotations

import argparse
import importlib.util
import re
import sys
from collections import Counter
from pathlib import Path
from types import ModuleType, SimpleNamespace

from _machine import machine
from memtrain.agent.imr import MAX_ENTITY_OCCURRENCES, MAX_ENTITY_WORDS
from memtrain.data.dataset import load_rows
from memtrain.data.leaks import find_leaks
from memtrain.data.masking import header_count, names_a_header, span_problem, variant_forms

_HEADER = re.compile(r"(?:^|\n\n)Document \d+:\n")


def load_masker(path: str | None) -> ModuleType | SimpleNamespace:
    if path is None:  # the candidates (entities.py) and the masking rule (masking.py) of this revision
        import memtrain.data.entities as entities
        import memtrain.data.masking as masking

        return SimpleNamespace(**vars(masking), **vars(entities))
    spec = importlib.util.spec_from_file_location("masker_under_test", path)
    if spec is None or spec.loader is None:
        sys.exit(f"--masker-from {path}: not a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def passages(context: str) -> list[tuple[int, str]]:
    """(offset, text) of each passage between the ``Document N:`` headers."""
    heads = list(_HEADER.finditer(context))
    return [(h.end(), context[h.end() : heads[i + 1].start() if i + 1 < len(heads) else len(context)])
            for i, h in enumerate(heads)]


def imr_targets(masker: ModuleType, row: dict) -> list[tuple[str, str, str]]:
    """(entity, label, masked passage) for every IMR target the masker accepts in the row's passages."""
    headers = header_count(row["context"])
    own_check = getattr(masker, "find_leaks", find_leaks)  # an older masker's own check; today's is leaks.py
    out = []
    for offset, text in passages(row["context"]):
        spans = [(s["start"] - offset, s["end"] - offset, s["label"]) for s in row["entity_spans"]
                 if offset <= s["start"] and s["end"] <= offset + len(text)]
        others = [text[s:e] for s, e, _ in spans]
        for c in masker.candidates(text, spans, MAX_ENTITY_OCCURRENCES, MAX_ENTITY_WORDS):
            if hasattr(masker, "names_a_header") and masker.names_a_header(c.text, headers):
                continue  # the current IMR rule (agent.imr._maskable)
            variants = masker.variant_forms(c.text, c.label, others)
            masked = masker.mask_forms(text, c.text, "[TARGET]", variants)
            if 0 < masked.count <= masker.DEFAULT_MAX_MASKS and not own_check(masked.text, c.text, variants):
                out.append((c.text, c.label, masked.text))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="a proxy data set (memtrain data proxy)")
    ap.add_argument("--masker-from", help="an entities.py to measure the IMR targets of (default: current)")
    ap.add_argument("--show", type=int, default=8, help="examples of each kind of problem to print")
    args = ap.parse_args()
    print(machine())
    masker = load_masker(args.masker_from)
    rows = load_rows(args.data)
    e2e: Counter[str] = Counter()
    imr: Counter[str] = Counter()
    examples: dict[str, list[str]] = {}

    def note(kind: str, text: str) -> None:
        examples.setdefault(kind, [])
        if len(examples[kind]) < args.show:
            examples[kind].append(text)

    def tally(counts: Counter[str], kind: str, entity: str, text: str, variants: list[str],
              headers: int) -> None:
        """One target: broken? a header number? a form of it left in ``text`` (the masked document/chunk)?"""
        counts["targets"] += 1
        if (problem := span_problem(entity)) is not None:
            counts["broken"] += 1
            note(f"{kind} broken ({problem})", entity)
        if names_a_header(entity, headers):
            counts["header"] += 1
            note(f"{kind} header number", entity)
        if leaks := find_leaks(text, entity, variants):
            counts["leaked"] += 1
            note(f"{kind} leak", f"{entity!r}: {leaks}")

    for row in rows:
        answer, ctx = row["answers"][0], row["context"]
        headers = header_count(ctx)
        others = [ctx[s["start"] : s["end"]] for s in row["entity_spans"]]
        tally(e2e, "e2e", answer, ctx, variant_forms(answer, row["entity_label"], others), headers)
        for entity, label, masked in imr_targets(masker, row):
            tally(imr, "imr", entity, masked, variant_forms(entity, label), headers)

    def rate(c: Counter[str], key: str, total: str) -> str:
        return f"{c[key]} ({100 * c[key] / max(c[total], 1):.2f}%)"

    print(f"data {args.data}: {len(rows)} documents; masker {args.masker_from or 'current'}")
    print("| targets | n | broken spans | header numbers | leaked |")
    print("|---|---:|---:|---:|---:|")
    print(f"| E2E answers | {e2e['targets']} | {rate(e2e, 'broken', 'targets')} | "
          f"{rate(e2e, 'header', 'targets')} | {rate(e2e, 'leaked', 'targets')} |")
    print(f"| IMR targets | {imr['targets']} | {rate(imr, 'broken', 'targets')} | "
          f"{rate(imr, 'header', 'targets')} | {rate(imr, 'leaked', 'targets')} |")
    for kind, texts in sorted(examples.items()):
        print(f"{kind}: " + "; ".join(texts))
    manifest = Path(args.data) / "manifest.json"
    if manifest.is_file():
        import json

        info = json.loads(manifest.read_text())
        print("manifest broken_spans:", info.get("broken_spans", "(not recorded)"))


if __name__ == "__main__":
    main()
