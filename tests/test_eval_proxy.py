"""`memtrain eval proxy`: the same IMR questions for every model, exact resume, bootstrap intervals, and the
paired comparison of `memtrain report A B`."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import memtrain.eval.runner as runner_mod
from memtrain.cli.main import main
from memtrain.config import Config
from memtrain.engines.base import Engine
from memtrain.engines.scripted import ScriptedEngine, kind_responder
from memtrain.errors import UserError
from memtrain.eval.proxy import document_scores, questions_of, run_proxy_eval
from memtrain.eval.report import EXAMPLES, PLOT, SUMMARY, TABLE
from memtrain.eval.stats import bootstrap_ci, paired_difference_ci, pooled_paired_ci
from memtrain.io import read_jsonl
from memtrain.prompts import parse
from memtrain.scoring import METRICS, contains_answer
from train_helpers import config_yaml, tiny_config, write_proxy_dataset

N_DOCS = 6


@pytest.fixture(scope="module")
def proxy_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_proxy_dataset(tmp_path_factory.mktemp("px") / "set", N_DOCS)


@pytest.fixture(scope="module")
def tok(tiny_model_dir: Path) -> Any:
    from memtrain.models import load_tokenizer

    return load_tokenizer(str(tiny_model_dir))


def _cfg(tiny_model_dir: Path, data: Path, extra: list[str] | None = None) -> Config:
    return tiny_config(tiny_model_dir, data, ["agent.answer_tokens=16", *(extra or [])])


def _engine(cfg: Config, tok: Any, tag: str, final: str = "\\boxed{France}",
            forget: str | None = None) -> ScriptedEngine:
    """Memory = ``tag`` + the chunk's first words (empty when the chunk holds ``forget``); fixed answers."""

    def memory(fields: dict[str, str], _: int) -> str:
        if forget is not None and forget in fields["chunk"]:
            return ""
        return f"{tag} " + " ".join(fields["chunk"].split()[:3])

    replies: dict[str, Any] = {"imr": "\\boxed{Paris}", "memory": memory, "final": final}
    return ScriptedEngine(kind_responder(replies, cfg.agent.templates), tok)


def _prompts(engine: ScriptedEngine, kind: str, templates: dict[str, str]) -> list[dict[str, str]]:
    return [f for call in engine.calls for r in call
            if (f := parse(kind, r.prompt_text or "", templates)) is not None]


def _by_id(out: Path) -> dict[str, dict[str, Any]]:
    return {r["id"]: r for r in read_jsonl(out / EXAMPLES)}


def test_two_models_get_the_same_prompts_and_imr_questions(proxy_set: Path, tmp_path: Path, tok: Any,
                                                           tiny_model_dir: Path) -> None:
    cfg = _cfg(tiny_model_dir, proxy_set)
    a = _engine(cfg, tok, "alpha")
    b = _engine(cfg, tok, "beta", final="\\boxed{Nowhere}", forget="Rome")
    sa = run_proxy_eval(cfg, proxy_set, tmp_path / "a", engine=a, tokenizer=tok, batch_size=4)
    # another batch size for B: the IMR draw depends on (seed, document id) only
    sb = run_proxy_eval(cfg, proxy_set, tmp_path / "b", engine=b, tokenizer=tok, batch_size=3)
    ra, rb = _by_id(tmp_path / "a"), _by_id(tmp_path / "b")
    assert set(ra) == set(rb) == {f"doc{i}" for i in range(N_DOCS)}

    # E2E: the first prompt of every document (initial memory, chunk 0) is the same for both models
    first_a = {r.prompt_text for call in a.calls for r in call
               if (f := parse("memory", r.prompt_text or "", cfg.agent.templates)) and f["memory"] == "none"}
    assert len(first_a) == 4  # 4 distinct articles; alpha never forgets, so these are the step-0 prompts
    assert first_a <= {r.prompt_text for call in b.calls for r in call}
    # IMR: the same (k, l, entity, label) for every document, whatever the memories held
    questions = {i: {k: r["imr"][k] for k in ("step_k", "chunk_l", "entity", "label")} for i, r in ra.items()}
    assert questions == {i: {k: r["imr"][k] for k in ("step_k", "chunk_l", "entity", "label")}
                         for i, r in rb.items()}
    assert all(0 <= q["chunk_l"] < q["step_k"] <= ra[i]["num_chunks"] for i, q in questions.items())
    # ... with the same masked chunk, and each model's OWN memory m_k in the prompt
    imr_a, imr_b = _prompts(a, "imr", cfg.agent.templates), _prompts(b, "imr", cfg.agent.templates)
    assert {p["chunk"] for p in imr_b} <= {p["chunk"] for p in imr_a}
    assert all("[TARGET]" in p["chunk"] for p in imr_a)
    assert {p["memory"] for p in imr_a} == {r["memories"][r["imr"]["step_k"]] for r in ra.values()}
    assert all(p["memory"].startswith("beta") for p in imr_b)
    # B forgot the chunks with Rome: those questions are not asked and score 0, but stay in the IMR mean
    empty = [r for r in rb.values() if r["imr"]["memory_empty"]]
    assert empty and len(imr_b) == N_DOCS - len(empty) and len(imr_a) == N_DOCS
    assert all(r["imr"]["prediction"] is None and set(r["imr"]["metrics"].values()) == {0.0} for r in empty)
    assert sa["imr"]["n"] == sb["imr"]["n"] == N_DOCS and sb["imr"]["memory_empty"] == len(empty)
    # what each memory kept: the label inside the memory asked from (alpha keeps a chunk's first 3 words)
    for run, summary in ((ra, sa), (rb, sb)):
        kept = [r["imr"]["in_memory"] for r in run.values()]
        assert kept == [float(contains_answer(r["memories"][r["imr"]["step_k"]], r["imr"]["label"]))
                        for r in run.values()]
        assert summary["imr"]["in_memory"]["mean"] == pytest.approx(sum(kept) / N_DOCS)
    assert all(r["imr"]["in_memory"] == 0.0 for r in empty)
    assert 0 < sum(r["imr"]["in_memory"] for r in ra.values()) < N_DOCS  # the test can tell both cases
    assert sa["imr"]["metrics"]["strict_em"]["mean"] == pytest.approx(
        sum(r["imr"]["label"] == "Paris" for r in ra.values()) / N_DOCS)
    # E2E: A always answers France (right for doc0, doc4), B never right
    assert sa["e2e"]["metrics"]["strict_em"]["mean"] == pytest.approx(2 / N_DOCS)
    assert sb["e2e"]["metrics"]["em"] == {"mean": 0.0, "lo": 0.0, "hi": 0.0, "n": N_DOCS}
    rec = ra["doc0"]
    assert rec["gold"] == ["France"] and rec["e2e"]["metrics"]["strict_em"] == 1.0
    assert set(rec["e2e"]["metrics"]) == set(rec["imr"]["metrics"]) == set(METRICS)
    assert rec["memories"][0] == "none" and rec["memories"][1].startswith("alpha")
    table = (tmp_path / "a" / TABLE).read_text()
    assert "| E2E | 6 | 33.33 [" in table and "| IMR | 6 |" in table
    assert (tmp_path / "a" / PLOT).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_more_imr_questions_keep_the_first_and_score_documents_by_their_mean(
        proxy_set: Path, tmp_path: Path, tok: Any, tiny_model_dir: Path) -> None:
    cfg = _cfg(tiny_model_dir, proxy_set)
    one = run_proxy_eval(cfg, proxy_set, tmp_path / "one", engine=_engine(cfg, tok, "a"), tokenizer=tok)
    more_cfg = _cfg(tiny_model_dir, proxy_set, ["train.eval_imr_questions=3"])  # the validation's setting
    more = run_proxy_eval(more_cfg, proxy_set, tmp_path / "more", engine=_engine(cfg, tok, "a"),
                          tokenizer=tok)
    r1, r3 = _by_id(tmp_path / "one"), _by_id(tmp_path / "more")
    assert "imr_more" not in r1["doc0"] and "imr_questions" not in one["protocol"]  # as before
    assert more["protocol"]["imr_questions"] == 3
    asked = {i: questions_of(r) for i, r in r3.items()}
    for i, qs in asked.items():
        assert qs[0] == r1[i]["imr"]  # the first question is the single one of the default
        keys = [(q["step_k"], q["chunk_l"], q["entity"]) for q in qs]
        assert 1 <= len(keys) <= 3 and len(set(keys)) == len(keys)  # distinct questions
    assert sum(len(qs) for qs in asked.values()) > N_DOCS  # the test set has documents with more
    # the engine answers "Paris": a document scores the share of its questions whose label is Paris
    per_doc = {i: sum(q["label"] == "Paris" for q in qs) / len(qs) for i, qs in asked.items()}
    assert document_scores(tmp_path / "more", "imr", "strict_em", rescore=True) == pytest.approx(per_doc)
    assert document_scores(tmp_path / "more", "imr", "strict_em") == pytest.approx(per_doc)
    assert more["imr"]["metrics"]["strict_em"]["mean"] == pytest.approx(sum(per_doc.values()) / N_DOCS)
    assert more["imr"]["n"] == N_DOCS and more["imr"]["questions"] == sum(len(qs) for qs in asked.values())
    kept = {i: sum(q["in_memory"] for q in qs) / len(qs) for i, qs in asked.items()}
    assert document_scores(tmp_path / "more", "imr", "in_memory") == pytest.approx(kept)
    with pytest.raises(UserError, match="--imr-questions 0: expected an integer >= 1"):
        run_proxy_eval(cfg, proxy_set, tmp_path / "bad", engine=_engine(cfg, tok, "a"), tokenizer=tok,
                       imr_questions=0)


def _interrupt_after_first_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the eval die right after it saved its first batch, as a killed process would."""
    real = runner_mod.append_jsonl
    calls = []

    def append(path: Path, rows: Any) -> None:
        calls.append(1)
        if len(calls) > 1:
            raise KeyboardInterrupt
        real(path, rows)

    monkeypatch.setattr(runner_mod, "append_jsonl", append)


def _run(cfg: Config, data: Path, out: Path, engine: Engine, tok: Any, **kw: Any) -> dict[str, Any]:
    return run_proxy_eval(cfg, data, out, engine=engine, tokenizer=tok, batch_size=2, **kw)


@pytest.mark.parametrize("sampled", [False, True], ids=["greedy-scripted", "sampled-tiny-model"])
def test_interrupted_run_resumes_exactly(proxy_set: Path, tmp_path: Path, tok: Any, tiny_model_dir: Path,
                                         monkeypatch: pytest.MonkeyPatch, sampled: bool) -> None:
    cfg = _cfg(tiny_model_dir, proxy_set, ["agent.memory_tokens=8"])
    make: Callable[[], Engine]
    if sampled:  # a real engine sampling at temperature 1: exactness needs the same seeds after the resume
        from memtrain.eval.runner import load_engine

        hf, _ = load_engine(cfg, None, tok)
        make = lambda: hf  # noqa: E731
        kw: dict[str, Any] = {"temperature": 1.0, "seed": 7}
    else:
        make = lambda: _engine(cfg, tok, "m", forget="Rome")  # noqa: E731
        kw = {}
    full = _run(cfg, proxy_set, tmp_path / "full", make(), tok, **kw)

    out = tmp_path / "resumed"
    with monkeypatch.context() as m:
        _interrupt_after_first_batch(m)
        with pytest.raises(KeyboardInterrupt):
            _run(cfg, proxy_set, out, make(), tok, **kw)
    assert len(read_jsonl(out / EXAMPLES)) == 2
    lines = (out / EXAMPLES).read_text().splitlines()
    (out / EXAMPLES).write_text(lines[0] + "\n" + lines[1][:25])  # and the last line cut mid-write
    resumed = _run(cfg, proxy_set, out, make(), tok, **kw)
    assert read_jsonl(out / EXAMPLES) == read_jsonl(tmp_path / "full" / EXAMPLES)
    assert resumed == full
    assert json.loads((out / SUMMARY).read_text()) == json.loads((tmp_path / "full" / SUMMARY).read_text())

    idle = _engine(cfg, tok, "m")  # everything done: nothing is generated again
    assert _run(cfg, proxy_set, out, idle, tok, **kw) == full and idle.calls == []
    # a limit is a view of the same run: the first documents, same records
    assert _run(cfg, proxy_set, out, idle, tok, limit=3, **kw)["ids"] == full["ids"][:3]
    with pytest.raises(ValueError, match=r"evaluation of something else.*protocol.seed"):
        _run(cfg, proxy_set, out, idle, tok, **{**kw, "seed": 99})


def test_resume_refuses_another_model_or_bad_flags(proxy_set: Path, tmp_path: Path, tok: Any,
                                                   tiny_model_dir: Path) -> None:
    cfg = _cfg(tiny_model_dir, proxy_set)
    run_proxy_eval(cfg, proxy_set, tmp_path / "r", engine=_engine(cfg, tok, "m"), tokenizer=tok, limit=1)
    other = _cfg(tiny_model_dir, proxy_set, ["model.name=someone/else"])
    with pytest.raises(ValueError, match=r"evaluation of something else.*model"):
        run_proxy_eval(other, proxy_set, tmp_path / "r", engine=_engine(cfg, tok, "m"), tokenizer=tok)
    for kw, flag in (({"limit": 0}, "--limit 0"), ({"batch_size": 0}, "--batch-size 0"),
                     ({"temperature": -1.0}, "--temperature -1.0"), ({"top_p": 0.0}, "--top-p 0.0")):
        with pytest.raises(ValueError, match=re.escape(flag)):
            run_proxy_eval(cfg, proxy_set, tmp_path / "bad", **kw)


def test_bootstrap_intervals_on_hand_checkable_cases() -> None:
    const = bootstrap_ci([0.5] * 7)
    assert (const.mean, const.lo, const.hi, const.n) == (0.5, 0.5, 0.5, 7)
    values = [0.0] * 30 + [1.0] * 70
    ci = bootstrap_ci(values, seed=1)
    assert ci.mean == pytest.approx(0.7) and ci.lo < 0.7 < ci.hi
    assert 0.58 < ci.lo < 0.65 and 0.75 < ci.hi < 0.82  # ~ 0.7 -/+ 1.96 * sqrt(0.21 / 100) = 0.09
    assert bootstrap_ci(values, seed=1) == ci  # fixed seed: the same interval every time
    wider = bootstrap_ci(values, confidence=0.99, seed=1)
    assert wider.lo <= ci.lo and wider.hi >= ci.hi
    run = {f"d{i}": v for i, v in enumerate(values)}
    same = paired_difference_ci(run, dict(run))
    assert (same.mean, same.lo, same.hi, same.n) == (0.0, 0.0, 0.0, 100)
    better = paired_difference_ci({"x": 0.0, "y": 0.0, "z": 1.0}, {"x": 1.0, "y": 1.0, "z": 1.0, "w": 0.0})
    assert better.n == 3 and better.mean == pytest.approx(2 / 3) and 0.0 <= better.lo <= better.hi <= 1.0
    with pytest.raises(ValueError, match="no document id"):
        paired_difference_ci({"a": 1.0}, {"b": 1.0})
    with pytest.raises(ValueError, match="non-empty"):
        bootstrap_ci([])
    with pytest.raises(ValueError, match=r"confidence=1\.5"):
        bootstrap_ci([1.0], confidence=1.5)


def test_pooled_interval_carries_the_spread_between_seeds() -> None:
    """Three seeds that agree give an interval like the paired one over all their documents; seeds that
    disagree (one gains, one loses) give a wide interval even when every seed has many documents."""
    def seed_pair(gain: float, n: int = 200, tag: str = "") -> tuple[dict[str, float], dict[str, float]]:
        base = {f"{tag}{i}": float(i % 2) for i in range(n)}
        return base, {k: v + gain for k, v in base.items()}

    agree = pooled_paired_ci([seed_pair(0.1, tag=s) for s in "abc"])
    assert agree.n == 600 and agree.mean == pytest.approx(0.1) and agree.lo == agree.hi == pytest.approx(0.1)
    mixed = [seed_pair(0.3, tag="a"), seed_pair(-0.3, tag="b"), seed_pair(0.3, tag="c")]
    wide = pooled_paired_ci(mixed)
    assert wide.mean == pytest.approx(0.1) and wide.lo < 0 < wide.hi  # the losing seed is not averaged away
    flat = paired_difference_ci(*[{**x, **y, **z} for x, y, z in zip(*mixed, strict=True)])
    assert flat.lo > 0  # ... as a bootstrap over the pooled documents alone would
    one = pooled_paired_ci([({"x": 0.0, "y": 1.0, "z": 0.0}, {"x": 1.0, "y": 1.0, "z": 0.0})])
    assert one.n == 3 and one.mean == pytest.approx(1 / 3) and 0.0 <= one.lo <= one.hi <= 1.0
    with pytest.raises(ValueError, match="replicate 0"):
        pooled_paired_ci([({"a": 1.0}, {"b": 1.0})])


def test_report_shows_the_paired_difference(proxy_set: Path, tmp_path: Path, tok: Any, tiny_model_dir: Path,
                                            capsys: pytest.CaptureFixture) -> None:
    cfg = _cfg(tiny_model_dir, proxy_set)
    base, trained = tmp_path / "base", tmp_path / "trained"
    run_proxy_eval(cfg, proxy_set, base, engine=_engine(cfg, tok, "b", final="\\boxed{Nowhere}"),
                   tokenizer=tok)
    run_proxy_eval(cfg, proxy_set, trained, engine=_engine(cfg, tok, "t"), tokenizer=tok)
    capsys.readouterr()
    assert main(["report", str(base), str(trained), "--labels", "base,trained",
                 "--out", str(tmp_path / "cmp.md")]) == 0
    text = capsys.readouterr().out
    assert "| metric | base (n=6) | trained (n=6) | trained - base |" in text
    a = {r["id"]: r["e2e"]["metrics"]["strict_em"] for r in read_jsonl(base / EXAMPLES)}
    b = {r["id"]: r["e2e"]["metrics"]["strict_em"] for r in read_jsonl(trained / EXAMPLES)}
    diff = paired_difference_ci(a, b)
    assert diff.mean == pytest.approx(2 / N_DOCS) and diff.lo >= 0.0
    row = next(line for line in text.splitlines() if line.startswith("| E2E strict_em |"))
    assert row.endswith(f"| +33.33 [{100 * diff.lo:.2f}, {100 * diff.hi:.2f}] |")
    assert "| IMR f1 |" in text and "paired over 6 matched documents" in text
    assert re.search(r"^\| IMR label in memory \| [\d.]+ \[.*\] \| [+-][\d.]+ \[", text, re.M)
    assert "6 of them the same questions (k, l, entity)" in text
    assert (tmp_path / "cmp.md").read_text() == text
    assert main(["report", str(base), str(trained), "--metric", "em"]) == 0
    text = capsys.readouterr().out
    assert "| E2E em |" in text and "E2E f1" not in text
    assert "| E2E answer words |" in text and "| IMR answer words |" in text
    # the per-document scores the pooled report pairs: as recorded, and re-graded from the predictions
    for part in ("e2e", "imr"):
        for metric in ("strict_em", "span_f1"):
            recorded = document_scores(trained, part, metric)
            assert recorded and document_scores(trained, part, metric, rescore=True) == recorded
    assert set(document_scores(base, "imr", "answer_words")) <= set(document_scores(base, "e2e", "f1"))


def test_cli_with_the_tiny_model(proxy_set: Path, tmp_path: Path, tiny_model_dir: Path,
                                 capsys: pytest.CaptureFixture) -> None:
    yaml = config_yaml(tiny_model_dir, proxy_set, tmp_path / "c.yaml")
    out = tmp_path / "cli"
    assert main(["eval", "proxy", "--config", str(yaml), "--data", str(proxy_set), "--out", str(out),
                 "--limit", "2", "agent.answer_tokens=6"]) == 0
    printed = capsys.readouterr().out
    assert "| E2E | 2 |" in printed and f"run: {out}" in printed
    summary = json.loads((out / SUMMARY).read_text())
    assert summary["protocol"]["decoding"] == "greedy" and summary["model"] == str(tiny_model_dir)
    assert summary["model_id"]["fingerprint"] and summary["ids"] == ["doc0", "doc1"]
    assert main(["report", str(out), str(out)]) == 0
    assert "+0.00 [0.00, 0.00]" in capsys.readouterr().out
