"""``memtrain data VERB``: build datasets (``proxy``, ...) and inspect any built dataset (``show``).

The ``data`` group is shared: a module that adds data commands (e.g. ``data longqa``) decorates a function
``(verbs) -> None`` with :func:`data_commands` (``verbs`` is the group's subparsers object; it adds its
parsers and sets ``func`` on each). The built-in ones live in ``memtrain/cli/data*.py`` (every such module
is imported when the group is built); a plug-in (``MEMTRAIN_PLUGINS``) registers the same way.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
import textwrap
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from memtrain.errors import UserError

DataCommands = Callable[[argparse._SubParsersAction], None]
_DATA_COMMANDS: dict[str, DataCommands] = {}


def data_commands(hook: DataCommands) -> DataCommands:
    """Register ``hook(verbs)``, which adds ``memtrain data`` verbs (see the module docstring)."""
    _DATA_COMMANDS[f"{hook.__module__}.{hook.__qualname__}"] = hook
    return hook


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="build training/evaluation datasets and inspect them")
    verbs = p.add_subparsers(dest="verb", metavar="VERB", required=True)
    import memtrain.cli as package

    for module in pkgutil.iter_modules(package.__path__, f"{package.__name__}."):
        if module.name.rsplit(".", 1)[-1].startswith("data"):
            importlib.import_module(module.name)
    for hook in _DATA_COMMANDS.values():
        hook(verbs)


# ------------------------------------------------------------------------------------------------ proxy

_PROXY_FLAGS: list[tuple[str, dict[str, Any]]] = [
    (
        "--corpus",
        {
            "metavar": "SPEC",
            "help": "wikipedia-vital (embedded), a .jsonl/.json/.parquet/.txt file or "
            "a directory of them, or hf:NAME[:CONFIG][:SPLIT] (default wikipedia-vital)",
        },
    ),
    ("--out", {"metavar": "DIR", "help": "output directory (parquet shards + manifest.json)"}),
    (
        "--num-docs",
        {"type": int, "metavar": "N", "help": "documents to build (default 1000; the paper used 30k)"},
    ),
    ("--passages", {"type": int, "metavar": "N", "help": "passages per document (default 150)"}),
    (
        "--related",
        {"type": int, "metavar": "N", "help": "retrieved related passages per document (default 29)"},
    ),
    ("--retriever", {"choices": ["dense", "bm25"], "help": "how related passages are found (default dense)"}),
    (
        "--embedder",
        {
            "metavar": "MODEL",
            "help": "sentence-transformers model for --retriever dense: minilm "
            "(embedded) or any HF name, e.g. BAAI/bge-base-en-v1.5 (default minilm)",
        },
    ),
    (
        "--tokenizer",
        {"metavar": "MODEL", "help": "policy tokenizer used for token counts (default smollm2-135m)"},
    ),
    (
        "--min-tokens",
        {"type": int, "metavar": "T", "help": "minimum document length in tokens (default 24000)"},
    ),
    (
        "--max-tokens",
        {"type": int, "metavar": "T", "help": "maximum document length in tokens (default 40000)"},
    ),
    ("--seed", {"type": int, "help": "random seed (default 42)"}),
    (
        "--workers",
        {
            "type": int,
            "metavar": "W",
            "help": "spaCy worker processes for large NER batches (default min(2, cores))",
        },
    ),
    (
        "--ner-model",
        {
            "metavar": "MODEL",
            "help": "spaCy model: installed package, directory or spacy-sm "
            "(default en_core_web_sm if installed, else spacy-sm)",
        },
    ),
    (
        "--entity-labels",
        {"nargs": "+", "metavar": "LABEL", "help": "only entities with these NER labels (default: all)"},
    ),
    (
        "--max-entity-occurrences",
        {"type": int, "metavar": "K", "help": "candidates occur fewer than K times in the pivot (default 5)"},
    ),
    (
        "--max-entity-words",
        {"type": int, "metavar": "K", "help": "candidates have fewer than K words (default 8)"},
    ),
    (
        "--max-masks",
        {
            "type": int,
            "metavar": "K",
            "help": "at most K [MASK] replacements per document, variants included (default 10)",
        },
    ),
    (
        "--text-field",
        {
            "metavar": "NAME",
            "help": "text column/field of the corpus (default text; extract for wikipedia-vital)",
        },
    ),
    ("--title-field", {"metavar": "NAME", "help": "optional title column/field (default title)"}),
    (
        "--max-passage-chars",
        {"type": int, "metavar": "C", "help": "longer paragraphs are split (default 1500)"},
    ),
    (
        "--min-passage-chars",
        {"type": int, "metavar": "C", "help": "shorter lines are joined to the next (default 50)"},
    ),
    ("--max-articles", {"type": int, "metavar": "N", "help": "read at most N articles of the corpus"}),
    ("--shard-size", {"type": int, "metavar": "ROWS", "help": "rows per parquet shard (default 1000)"}),
    (
        "--cache-dir",
        {"metavar": "DIR", "help": "passage store, NER and index cache (default $MEMTRAIN_HOME/cache)"},
    ),
    (
        "--max-redraws",
        {
            "type": int,
            "metavar": "K",
            "help": "new random passages for a too-short document, at most K times (default 10)",
        },
    ),
    (
        "--exclude-from",
        {
            "nargs": "+",
            "metavar": "DIR",
            "help": "proxy datasets (same corpus) whose articles this one must not use: a held-out set",
        },
    ),
]


@data_commands
def proxy_and_show(verbs: argparse._SubParsersAction) -> None:
    p = verbs.add_parser(
        "proxy",
        help="build MemTrain's masked-reconstruction documents (proxy task) from Wikipedia",
        description="Pivot passage + related + random passages, shuffled, one pivot entity masked "
        "everywhere. Flags override the values of --config.",
    )
    p.add_argument(
        "--config", metavar="FILE", help="YAML file with any of the options below (underscored keys)"
    )
    for flag, kwargs in _PROXY_FLAGS:
        p.add_argument(flag, default=argparse.SUPPRESS, **kwargs)
    p.add_argument(
        "--overwrite",
        action="store_true",
        default=argparse.SUPPRESS,
        help="replace an existing dataset in --out",
    )
    p.set_defaults(func=_proxy)

    s = verbs.add_parser("show", help="print samples and statistics of a built dataset")
    s.add_argument("dir", metavar="DIR", help="dataset directory")
    s.add_argument("--n", type=int, default=3, help="samples to print (default 3)")
    s.set_defaults(func=_show)


def proxy_config(args: argparse.Namespace) -> Any:
    """The ProxyConfig of ``--config`` (if any) with the flags given on the command line on top."""
    from memtrain.config import ConfigError, load_config
    from memtrain.data.proxy import ProxyConfig

    base = load_config(args.config, cls=ProxyConfig) if getattr(args, "config", None) else ProxyConfig()
    given = {k: getattr(args, k) for k in ProxyConfig.model_fields if hasattr(args, k)}
    try:
        return ProxyConfig.model_validate({**base.model_dump(exclude_unset=True), **given})
    except ValidationError as exc:
        msgs = [
            f"--{str(e['loc'][0]).replace('_', '-')}: {e['msg']}" if e["loc"] else e["msg"]
            for e in exc.errors()
        ]
        raise ConfigError("invalid data proxy options: " + "; ".join(msgs)) from None


def _proxy(args: argparse.Namespace) -> int:
    from memtrain.data.proxy import build_proxy_dataset

    manifest = build_proxy_dataset(proxy_config(args))
    skipped = ", ".join(f"{k} {v}" for k, v in manifest["skipped"].items()) or "none"
    print(
        f"wrote {manifest['num_rows']} proxy documents ({manifest['token_stats']['min']}-"
        f"{manifest['token_stats']['max']} tokens) to {manifest['params']['out']} in "
        f"{manifest['wall_time_s']:.1f}s; pivots skipped: {skipped}"
    )
    print(masking_summary(manifest))
    return 0


def masking_summary(manifest: dict[str, Any]) -> str:
    """One line on how the answers were masked: masks per document, variants, determiners, leak rate."""
    m = manifest.get("masking")
    if not isinstance(m, dict):
        return "masking: not recorded (dataset built before memtrain recorded leak checks)"
    masks, variants = m["masks_per_doc"], m["variants_masked_per_doc"]
    return (
        f"masking: [MASK] per document min {masks['min']}, mean {masks['mean']}, max {masks['max']} "
        f"(cap {m['max_masks']}); variants masked in {m['docs_with_variants_masked']} documents (mean "
        f"{variants['mean']}); leading determiner stripped from {m['answers_determiner_stripped']} answers; "
        f"leak rate {m['leak_rate']:.3f} ({m['leaked_docs']} documents with a surviving variant)"
    )


# ------------------------------------------------------------------------------------------------ show

_HL_ON, _HL_OFF = "\x1b[1;31m", "\x1b[0m"


def _histogram(values: list[int], bins: int = 10, width: int = 40) -> list[str]:
    lo, hi = min(values), max(values)
    step = max(1, -(-(hi - lo + 1) // bins))
    counts = Counter((v - lo) // step for v in values)
    peak = max(counts.values())
    lines = []
    for b in range(-(-(hi - lo + 1) // step)):
        n = counts.get(b, 0)
        bar = "#" * round(width * n / peak)
        lines.append(f"  {lo + b * step:>7d}-{lo + (b + 1) * step - 1:<7d} {bar:<{width}s} {n}")
    return lines


def _snippets(context: str, marker: str, color: bool, radius: int = 160, limit: int = 3) -> list[str]:
    out = []
    start = 0
    while len(out) < limit:
        i = context.find(marker, start)
        if i < 0:
            break
        a, b = max(0, i - radius), min(len(context), i + len(marker) + radius)
        piece = " ".join(context[a:b].split())
        piece = piece.replace(marker, f"{_HL_ON}{marker}{_HL_OFF}" if color else f">>{marker}<<")
        out.append(("..." if a > 0 else "") + piece + ("..." if b < len(context) else ""))
        start = i + len(marker)
    return out


def _sample_lines(i: int, row: dict[str, Any], color: bool) -> list[str]:
    """One sample of ``memtrain data show``: its answer, question and the context around the mask."""
    from memtrain.prompts import MASK_TOKEN

    lines = [f"--- sample {i + 1}: {row['id']} ---"]
    if "pivot_title" in row:
        lines.append(
            f"pivot: {row['pivot_title']!r} (Document {row.get('pivot_position')} of "
            f"{row.get('num_passages')}), {row.get('num_tokens')} tokens, "
            f"{len(row.get('entity_spans') or [])} entity spans"
        )
    label = f" ({row['entity_label']})" if "entity_label" in row else ""
    variants = f" ({row['num_variants_masked']} variants)" if row.get("num_variants_masked") else ""
    lines.append(
        f"answers: {row['answers']}{label}"
        + (f", masked {row['num_masked']} times{variants}" if "num_masked" in row else "")
    )
    lines.append("question: " + textwrap.shorten(row["question"], 300))
    context = row.get("context")
    if isinstance(context, str):
        snippets = _snippets(context, MASK_TOKEN, color)
        if snippets:
            lines.append(f"context ({len(context)} chars) around {MASK_TOKEN}:")
            lines.extend(f"  {s}" for s in snippets)
        else:
            lines.append("context: " + textwrap.shorten(context, 400))
    return lines


def format_show(data_dir: str | Path, n: int = 3, color: bool = False) -> str:
    """Dataset summary (manifest, token-length histogram, label counts) and ``n`` samples with the mask
    highlighted; works for any task's dataset, showing what its columns allow."""
    from memtrain.data.dataset import iter_rows, read_manifest

    manifest = read_manifest(data_dir)
    columns = set(manifest.get("columns", {}))
    lines = [
        f"dataset {data_dir}: task {manifest.get('task')}, {manifest.get('num_rows')} rows in "
        f"{len(manifest['shards'])} shard(s), memtrain {manifest.get('memtrain_version')}"
    ]
    corpus = manifest.get("corpus")
    if isinstance(corpus, dict):
        lines.append(
            f"corpus: {corpus.get('spec')} ({corpus.get('articles')} articles -> {corpus.get('passages')} "
            f"passages; skipped {corpus.get('skipped') or 'none'})"
        )
    params = manifest.get("params")
    if isinstance(params, dict) and manifest.get("task") == "proxy":
        lines.append(
            f"params: {params.get('passages')} passages ({params.get('related')} related, retriever "
            f"{params.get('retriever')}), {params.get('min_tokens')}-{params.get('max_tokens')} tokens "
            f"({params.get('tokenizer')}), seed {params.get('seed')}"
        )
    if manifest.get("skipped"):
        lines.append("pivots skipped: " + ", ".join(f"{k} {v}" for k, v in manifest["skipped"].items()))
    if "wall_time_s" in manifest:
        lines.append(f"built in {manifest['wall_time_s']}s")
    if manifest.get("task") == "proxy":
        lines.append(masking_summary(manifest))
        hist = manifest.get("masking", {}).get("masks_per_doc", {}).get("histogram")
        if hist:
            lines.append("[MASK] per document: " + ", ".join(f"{k}: {v}" for k, v in hist.items()))
    stat_cols = [c for c in ("num_tokens", "entity_label") if c in columns]
    if stat_cols:
        stats = list(iter_rows(data_dir, columns=stat_cols))
        if "num_tokens" in columns:
            toks = [r["num_tokens"] for r in stats]
            lines.append(f"tokens: min {min(toks)}, mean {sum(toks) / len(toks):.0f}, max {max(toks)}")
            lines.extend(_histogram(toks))
        if "entity_label" in columns:
            labels = Counter(r["entity_label"] for r in stats)
            lines.append(
                "entity labels: "
                + ", ".join(f"{k} {v} ({100 * v / len(stats):.0f}%)" for k, v in labels.most_common())
            )
    for i, row in enumerate(iter_rows(data_dir)):
        if i >= n:
            break
        lines += ["", *_sample_lines(i, row, color)]
    return "\n".join(lines)


def _show(args: argparse.Namespace) -> int:
    if args.n < 0:
        raise UserError(f"--n {args.n}: expected a number of samples >= 0")
    print(format_show(args.dir, args.n, color=sys.stdout.isatty()))
    return 0
