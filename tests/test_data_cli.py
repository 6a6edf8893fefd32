"""``memtrain data proxy|show``: flags, config files, errors and the extensible ``data`` group."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pytest

from data_helpers import build_ruler_ner, make_articles, write_jsonl
from memtrain.cli import data as data_cli
from memtrain.cli.main import build_parser, main
from memtrain.data.dataset import load_rows, write_dataset


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("data-cli")
    return {
        "root": root,
        "corpus": write_jsonl(root / "articles" / "corpus.jsonl", make_articles(n_per_topic=6, seed=2)),
        "ner": build_ruler_ner(root / "ruler"),
        "tokenizer": tiny_model_dir,
    }


def _flags(env: dict[str, Path], out: str) -> list[str]:
    return [
        "data",
        "proxy",
        "--corpus",
        str(env["root"] / "articles"),
        "--out",
        str(env["root"] / out),
        "--ner-model",
        str(env["ner"]),
        "--tokenizer",
        str(env["tokenizer"]),
        "--retriever",
        "bm25",
        "--cache-dir",
        str(env["root"] / "cache"),
        "--passages",
        "6",
        "--related",
        "2",
        "--min-tokens",
        "0",
        "--max-tokens",
        "50000",
        "--num-docs",
        "5",
        "--workers",
        "1",
    ]


def test_proxy_then_show(env, capsys) -> None:
    assert main(_flags(env, "ds")) == 0
    out = capsys.readouterr().out
    assert out.startswith("wrote 5 proxy documents") and str(env["root"] / "ds") in out
    rows = load_rows(env["root"] / "ds")
    assert len(rows) == 5 and all(r["num_passages"] == 6 for r in rows)
    assert main(["data", "show", str(env["root"] / "ds"), "--n", "2"]) == 0
    shown = capsys.readouterr().out
    assert "task proxy, 5 rows in 1 shard(s)" in shown
    assert "params: 6 passages (2 related, retriever bm25)" in shown
    assert shown.count("--- sample") == 2 and ">>[MASK]<<" in shown  # the mask is highlighted
    assert "entity labels: " in shown and "tokens: min " in shown
    histogram = [line for line in shown.splitlines() if line.startswith("  ") and "#" in line]
    assert (
        histogram
        and sum(
            int(line.split()[-1])
            for line in shown.splitlines()
            if line.startswith("  ") and line.split()[0][0].isdigit()
        )
        == 5
    )
    assert f"answers: {rows[0]['answers']}" in shown


def test_config_file_with_flag_overrides(env, capsys) -> None:
    cfg = env["root"] / "proxy.yaml"
    cfg.write_text(
        f"corpus: {env['corpus']}\nner_model: {env['ner']}\ntokenizer: {env['tokenizer']}\nretriever: bm25\n"
        f"cache_dir: {env['root'] / 'cache'}\npassages: 5\nrelated: 1\nmin_tokens: 0\nmax_tokens: 50000\n"
        f"num_docs: 4\nseed: 3\nout: {env['root'] / 'from-file'}\n",
        encoding="utf-8",
    )
    assert main(["data", "proxy", "--config", str(cfg), "--num-docs", "2"]) == 0
    manifest = json.loads((env["root"] / "from-file" / "manifest.json").read_text())
    assert manifest["num_rows"] == 2 and manifest["params"]["num_docs"] == 2
    assert manifest["params"]["passages"] == 5 and manifest["params"]["seed"] == 3
    assert load_rows(env["root"] / "from-file")[0]["id"] == "proxy-3-000000"


@pytest.mark.parametrize(
    ("extra", "yaml_text", "message"),
    [
        (["--related", "6"], None, "related=6 must be below passages=6"),
        (["--num-docs", "0"], None, "--num-docs: Input should be greater than 0"),
        ([], "pasages: 5\n", "unknown key 'pasages'; did you mean 'passages'?"),
        (["--text-field", "body"], None, "corpus.jsonl:1: no text field 'body' (fields: title, text, topic)"),
    ],
)
def test_user_errors_are_one_clear_line(env, capsys, extra, yaml_text, message) -> None:
    argv = _flags(env, "bad") + extra
    if yaml_text is not None:
        (env["root"] / "bad.yaml").write_text(yaml_text, encoding="utf-8")
        argv += ["--config", str(env["root"] / "bad.yaml")]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (env["root"] / "bad").exists()


def test_show_rejects_non_datasets_and_handles_other_tasks(tmp_path, capsys) -> None:
    assert main(["data", "show", str(tmp_path)]) == 1
    assert "is not a memtrain dataset: no manifest.json" in capsys.readouterr().err
    schema = pa.schema([("id", pa.string()), ("question", pa.string()), ("answers", pa.list_(pa.string()))])
    write_dataset(
        tmp_path / "qa",
        [{"id": "q1", "question": "Who wrote Hamlet?", "answers": ["Shakespeare"]}],
        schema,
        "searchqa",
    )
    assert main(["data", "show", str(tmp_path / "qa")]) == 0
    shown = capsys.readouterr().out
    assert "task searchqa, 1 rows" in shown and "answers: ['Shakespeare']" in shown and "tokens:" not in shown


def test_other_modules_can_add_data_subcommands(monkeypatch) -> None:
    build_parser()  # the built-in data modules register first, into the real registry
    monkeypatch.setattr(data_cli, "_DATA_COMMANDS", dict(data_cli._DATA_COMMANDS))  # undone after the test

    @data_cli.data_commands
    def fakeqa(verbs) -> None:  # what a plug-in module (MEMTRAIN_PLUGINS) does at import
        p = verbs.add_parser("fakeqa", help="a fake data command")
        p.add_argument("--paragraphs", type=int, default=50)
        p.set_defaults(func=lambda args: 0)

    args = build_parser().parse_args(["data", "fakeqa", "--paragraphs", "7"])
    assert args.paragraphs == 7 and args.func(args) == 0
    args = build_parser().parse_args(["data", "show", "somewhere"])  # ours are still there
    assert args.dir == "somewhere"
