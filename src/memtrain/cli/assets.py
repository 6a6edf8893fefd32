"""``memtrain assets fetch|list``: the embedded default model, corpus, NER model and embedder."""

from __future__ import annotations

import argparse

from memtrain import assets


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("assets", help="fetch or list the embedded default assets")
    verbs = p.add_subparsers(dest="verb", metavar="VERB", required=True)
    f = verbs.add_parser("fetch", help="download, verify and unpack the embedded assets (idempotent)")
    f.add_argument(
        "--only",
        nargs="+",
        choices=list(assets.ASSETS),
        metavar="NAME",
        help=f"only these assets ({', '.join(assets.ASSETS)})",
    )
    f.add_argument("--force", action="store_true", help="fetch again even when present")
    f.set_defaults(func=_fetch)
    ls = verbs.add_parser("list", help="show each asset's status, path, size and checksum verification")
    ls.set_defaults(func=_list)


def _fetch(args: argparse.Namespace) -> int:
    for name in args.only or list(assets.ASSETS):
        was_present = assets.is_present(name)
        path = assets.fetch(name, force=args.force)
        print(f"{name:16s} {'already present' if was_present and not args.force else 'fetched'}  {path}")
    return 0


def _list(args: argparse.Namespace) -> int:
    rows = [assets.status(name) for name in assets.ASSETS]
    print(f"{'name':16s} {'status':8s} {'size':>9s} {'sha256':8s} path")
    for r in rows:
        size = f"{r['size_mb']:.1f} MB" if r["status"] == "present" else "-"
        verified = "yes" if r["sha256_verified"] else "no"
        print(f"{r['name']:16s} {r['status']:8s} {size:>9s} {verified:8s} {r['path']}")
    print(f"cache: {assets.home()} (set MEMTRAIN_HOME to move it)")
    return 0
