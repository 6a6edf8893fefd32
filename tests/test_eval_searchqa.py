"""`memtrain eval searchqa`: per-data-set EM over objectives, malformed counts, resume, retriever specs."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import pytest

from memtrain.cli.main import main
from memtrain.config import load_config
from memtrain.data.searchqa import build_searchqa, write_searchqa
from memtrain.engines.scripted import ScriptedEngine
from memtrain.eval.report import EXAMPLES, TABLE
from memtrain.eval.searchqa import run_searchqa_eval
from memtrain.io import read_jsonl
from memtrain.prompts import parse
from memtrain.retrieval.service import Retriever

CAPITALS = {"France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Japan": "Tokyo",
            "Egypt": "Cairo"}


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("sq")
    corpus = d / "corpus.jsonl"
    lines = [json.dumps({"id": str(i), "contents": f'"{city}"\n{city} is the capital of {c}.'})
             for i, (c, city) in enumerate(CAPITALS.items())]
    corpus.write_text("\n".join(lines) + "\n")
    qa = {"geo": [{"question": f"What is the capital of {c}?", "answer": city}
                  for c, city in CAPITALS.items()],
          "trivia": [{"question": f"Capital city of {c}?", "answer": [city, city.upper()]}
                     for c, city in list(CAPITALS.items())[:4]]}
    files = []
    for name, recs in qa.items():
        files.append(d / f"{name}.json")
        files[-1].write_text(json.dumps(recs))
    data = d / "set"
    write_searchqa(data, build_searchqa(files, 2, seed=0), {})
    return {"corpus": corpus, "data": data, "index": d / "index"}


@pytest.fixture(scope="module")
def tok(tiny_model_dir: Path) -> Any:
    from memtrain.models import load_tokenizer

    return load_tokenizer(str(tiny_model_dir))


def respond(prompt: str, sample: int) -> str:
    """Search each country once; answer from the results. Tasks about Japan get a malformed reply."""
    fields = parse("search", prompt) or parse("search_last", prompt)
    problem, memory = fields["problem"], fields["memory"]
    countries = re.findall(r"(?:capital of|Capital city of) (\w+)\?", problem)
    if "Japan" in countries:
        return "no idea"
    seen = re.findall(r"\(Title: (\w+)\)", prompt)
    known = {c: CAPITALS[c] for c in countries if CAPITALS[c] in seen or CAPITALS[c] in memory}
    missing = [c for c in countries if c not in known]
    note = ", ".join(f"{c}: {city}" for c, city in known.items())
    if missing:
        return f"<memory>{note}</memory><search>capital of {missing[0]}</search>"
    return f"<memory>{note}</memory> \\boxed{{{'; '.join(known[c] for c in countries)}}}"


def test_per_dataset_em_with_malformed_counted(setup: dict[str, Path], tmp_path: Path, tok: Any,
                                               tiny_model_dir: Path) -> None:
    cfg = load_config(None, [f"model.name={tiny_model_dir}", "search.max_turns=4"])
    backend = Retriever.build(setup["corpus"], setup["index"])
    out = tmp_path / "run"
    engine = ScriptedEngine(respond, tok)
    summary = run_searchqa_eval(cfg, setup["data"], out, engine=engine, tokenizer=tok, backend=backend)
    assert summary["order"] == ["geo", "trivia"]
    recs = read_jsonl(out / EXAMPLES)
    assert len(recs) == 5  # 3 geo tasks + 2 trivia tasks, 2 objectives each
    for r in recs:
        japan = "Japan" in r["question"]
        assert r["outcome"] == ("malformed" if japan else "answer")
        assert r["metrics"]["em"] == (0.0 if japan else 1.0)
        assert r["searches"] == (0 if japan else 2) and len(r["trace"]) == r["turns"]
    geo = summary["groups"]["geo"]
    assert geo["metrics"]["em"] == pytest.approx(2 / 3) and geo["malformed"] == pytest.approx(1 / 3)
    assert summary["groups"]["trivia"]["metrics"]["em"] == 1.0
    assert summary["average"]["em"] == pytest.approx((2 / 3 + 1) / 2) and summary["main_metric"] == "em"
    assert "| geo | 3 |" in (out / TABLE).read_text()
    again = ScriptedEngine(respond, tok)
    assert run_searchqa_eval(cfg, setup["data"], out, engine=again, tokenizer=tok, backend=backend) == summary
    assert again.calls == []


def test_requires_a_retriever(setup: dict[str, Path], tmp_path: Path, tiny_model_dir: Path) -> None:
    cfg = load_config(None, [f"model.name={tiny_model_dir}"])
    with pytest.raises(ValueError, match="--retriever: required"):
        run_searchqa_eval(cfg, setup["data"], tmp_path / "x")


def test_cli_with_corpus_retriever_and_tiny_model(setup: dict[str, Path], tmp_path: Path,
                                                  tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setenv("MEMTRAIN_HOME", str(tmp_path / "home"))
    out = tmp_path / "cli"
    assert main(["eval", "searchqa", "--model", str(tiny_model_dir), "--data", str(setup["data"]),
                 "--retriever", str(setup["corpus"]), "--out", str(out), "--limit", "1",
                 "search.max_turns=2", "search.response_tokens=8"]) == 0
    printed = capsys.readouterr().out
    assert "| geo | 1 |" in printed and "| trivia | 1 |" in printed
    assert list((tmp_path / "home" / "retrievers").iterdir())  # the BM25 index was built and cached
    assert all(r["outcome"] in ("answer", "malformed", "no_answer") for r in read_jsonl(out / EXAMPLES))


@pytest.mark.slow
@pytest.mark.usefixtures("one_torch_thread")
def test_smollm2_on_bamboogle_with_wiki18_sample(shared_data: Path, smollm2_dir: str, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """SmolLM2 end to end on real Bamboogle tasks with the wiki-18 sample as corpus (tiny budgets)."""
    monkeypatch.setenv("MEMTRAIN_HOME", str(tmp_path / "home"))
    data = tmp_path / "set"
    write_searchqa(data, build_searchqa([shared_data / "qa-eval" / "bamboogle.json"], 2, 42, num_tasks=2), {})
    cfg = load_config(None, ["model.name=smollm2-135m", "search.max_turns=2", "search.response_tokens=16",
                             "search.results_tokens=96",
                             f"search.retriever={shared_data / 'wiki18-sample' / 'passages.jsonl'}"])
    summary = run_searchqa_eval(cfg, data, tmp_path / "run")
    assert summary["groups"]["bamboogle"]["n"] == 2
    recs = read_jsonl(tmp_path / "run" / EXAMPLES)
    assert all(r["turns"] >= 1 and len(r["gold"]) == 2 for r in recs)
    assert 0.0 <= summary["average"]["em"] <= 1.0


@pytest.mark.slow
def test_ivf_pq_index_gives_flat_results_end_to_end(setup: dict[str, Path], tmp_path: Path, tok: Any,
                                                    tiny_model_dir: Path, minilm_dir: str) -> None:
    """#27: `eval searchqa` against `serve-retriever`'s server over an IVF-PQ index (4-bit codes on this
    small corpus, every list probed, candidates re-ranked exactly from the embedding shards) gives what it
    gives on the flat index, episode for episode. The codes alone are coarse here: re-ranking 10 x k
    candidates missed one of the 18 top-3 passages of these queries, 20 x k none; 50 x k is served."""
    from memtrain.retrieval.server import RetrieverServer

    corpus = tmp_path / "corpus.jsonl"
    things = ["bridge", "violin", "comet", "harbour", "glacier", "library", "engine", "orchard"]
    places = ["Oslo", "Lima", "Perth", "Quito", "Accra", "Hanoi", "Lyon", "Osaka", "Nairobi", "Bergen"]
    lines = [json.dumps({"id": str(i), "contents": f'"{city}"\n{city} is the capital of {c}.'})
             for i, (c, city) in enumerate(CAPITALS.items())]
    lines += [json.dumps({"id": f"f{i}", "contents": f'"Note {i}"\nThe {things[i % 8]} near {places[i % 10]} '
                          f"was recorded in {1800 + i}."}) for i in range(700)]
    corpus.write_text("\n".join(lines) + "\n")
    ivf, flat = tmp_path / "ivf-pq", tmp_path / "flat"
    assert main(["build-index", "--corpus", str(corpus), "--index", str(ivf), "--kind", "ivf-pq",
                 "--embedder", minilm_dir]) == 0
    shutil.copytree(f"{ivf}.shards", f"{flat}.shards")  # the same vectors, not embedded again
    assert main(["build-index", "--corpus", str(corpus), "--index", str(flat), "--kind", "dense",
                 "--embedder", minilm_dir]) == 0
    served = Retriever.open(ivf, rerank=50)
    settings = served.health()["index"]
    assert settings["structure"] == "ivf-pq" and settings["pq_bits"] == 4 and settings["rerank"] == 50
    assert settings["nprobe"] == settings["nlist"]
    cfg = load_config(None, [f"model.name={tiny_model_dir}", "search.max_turns=4"])
    runs = {}
    with RetrieverServer(served, "127.0.0.1", 0) as srv:
        for name, spec in (("flat", str(flat)), ("ivf-pq", srv.url)):
            out = tmp_path / f"eval-{name}"
            summary = run_searchqa_eval(cfg, setup["data"], out, retriever=spec,
                                        engine=ScriptedEngine(respond, tok), tokenizer=tok)
            runs[name] = (summary, read_jsonl(out / EXAMPLES))
    (flat_summary, flat_records), (ivf_summary, ivf_records) = runs["flat"], runs["ivf-pq"]
    assert ivf_records == flat_records and len(flat_records) == 5
    assert ivf_summary["groups"] == flat_summary["groups"]
    assert flat_summary["groups"]["trivia"]["metrics"]["em"] == 1.0  # the capitals were found
    assert srv.batcher.searches >= 1
