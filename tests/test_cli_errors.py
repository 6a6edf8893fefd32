"""Issue #14 (items 4, 5, 10): OS errors and over-long budgets are one-line errors before any work, long
commands report progress, and budgets without a config follow the model and the device."""

from __future__ import annotations

import argparse
import errno
import json
import logging
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from memtrain.agent.loop import MemoryAgent
from memtrain.assets import AssetError
from memtrain.budgets import (
    PAPER_BUDGETS,
    SMALL_CPU_BUDGETS,
    apply_default_budgets,
    check_context_budget,
    context_need,
    default_budgets,
)
from memtrain.cli.main import main
from memtrain.config import AgentConfig, ConfigError, load_config
from memtrain.data.dataset import DatasetError
from memtrain.data.longqa import HotpotExample, build_longqa, write_longqa
from memtrain.engines.scripted import ScriptedEngine
from memtrain.errors import UserError
from memtrain.eval.longqa import run_longqa_eval
from memtrain.eval.registry import register_eval
from memtrain.io import DirLockedError, NotWritableError, check_writable
from memtrain.models import ModelLoadError
from memtrain.progress import Progress
from memtrain.retrieval.service import RetrieverError


def _error_line(err: str, command: str) -> str:
    """The command's error: exactly one line, no traceback."""
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith(f"memtrain {command}: error:")]
    assert len(lines) == 1, err
    return lines[0]


# --- item 4: OS errors -------------------------------------------------------------------------------------

@pytest.fixture()
def under_a_file(tmp_path: Path) -> Path:
    """A path whose parent is a regular file: unwritable even for root, who ignores permission bits."""
    blocker = tmp_path / "a-file"
    blocker.write_text("x", encoding="utf-8")
    return blocker / "sub"


def test_check_writable_names_the_path_and_the_reason(under_a_file: Path, tmp_path: Path) -> None:
    with pytest.raises(NotWritableError, match=r"--out .*a-file/sub: cannot write there: Not a directory"):
        check_writable(under_a_file, "--out")
    made = check_writable(tmp_path / "new" / "dir", "--out")
    assert made.is_dir() and list(made.iterdir()) == []  # the probe file is gone


def test_unwritable_eval_out_fails_before_data_or_model(under_a_file: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture) -> None:
    rc = main(["eval", "longqa", "--model", "no-such-model", "--data", str(tmp_path / "absent"),
               "--out", str(under_a_file)])
    line = _error_line(capsys.readouterr().err, "eval")
    assert rc == 1 and f"--out {under_a_file}: cannot write there: Not a directory" in line


def test_unwritable_proxy_out_fails_before_the_corpus_loads(under_a_file: Path,
                                                            monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture) -> None:
    import memtrain.data.proxy as proxy

    def no_corpus(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the corpus was loaded before --out was checked")

    monkeypatch.setattr(proxy, "open_store", no_corpus)
    rc = main(["data", "proxy", "--out", str(under_a_file / "set")])
    line = _error_line(capsys.readouterr().err, "data")
    assert rc == 1 and "cannot write there: Not a directory" in line and str(under_a_file) in line


def _fail_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--raise", dest="error", choices=sorted(FAILURES), required=True)


FAILURES: dict[str, Callable[[], BaseException]] = {
    "disk-full": lambda: OSError(errno.ENOSPC, "No space left on device", "/runs/x/examples.jsonl"),
    "bug": lambda: RuntimeError("an internal bug"),
    "value-bug": lambda: ValueError("an internal check failed"),
    "user": lambda: UserError("--data d: not a data set"),
    "retriever": lambda: RetrieverError("retriever http://127.0.0.1:8001/search: HTTP 503: busy"),
}


@register_eval("fail", help="raises the error --raise names", main_metric="em", arguments=_fail_arguments,
               agent_budgets=False)
def fail_command(cfg: Any, args: argparse.Namespace) -> dict[str, Any]:
    """Raise the error ``--raise`` names, where a real evaluation would fail."""
    raise FAILURES[args.error]()


def test_os_errors_are_one_line_and_bugs_keep_their_traceback(tmp_path: Path,
                                                              capsys: pytest.CaptureFixture) -> None:
    argv = ["eval", "fail", "--data", "d", "--out", str(tmp_path / "o"), "--raise"]
    assert main([*argv, "disk-full"]) == 1
    assert _error_line(capsys.readouterr().err, "eval") == (
        "memtrain eval: error: /runs/x/examples.jsonl: No space left on device (ENOSPC)")
    with pytest.raises(RuntimeError, match="an internal bug"):
        main([*argv, "bug"])


def test_user_errors_are_one_line_and_an_internal_value_error_keeps_its_traceback(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    for cls in (AssetError, ConfigError, DatasetError, DirLockedError, ModelLoadError, NotWritableError):
        assert issubclass(cls, UserError) and issubclass(cls, ValueError)
    argv = ["eval", "fail", "--data", "d", "--out", str(tmp_path / "o"), "--raise"]
    assert main([*argv, "user"]) == 1
    assert _error_line(capsys.readouterr().err, "eval") == "memtrain eval: error: --data d: not a data set"
    assert main([*argv, "retriever"]) == 1  # a server that fails is not our bug either
    assert "HTTP 503: busy" in _error_line(capsys.readouterr().err, "eval")
    with pytest.raises(ValueError, match="an internal check failed") as info:
        main([*argv, "value-bug"])
    assert not isinstance(info.value, UserError)
    # the same bug in a real process: a traceback and a failing exit status, not one polite line
    script = tmp_path / "bug.py"
    script.write_text(
        "import sys\n"
        "from memtrain.cli.main import main\n"
        "from memtrain.eval.registry import register_eval\n\n\n"
        "@register_eval('bug', help='an internal check fails', main_metric='em', agent_budgets=False)\n"
        "def bug(cfg, args):\n"
        "    raise ValueError('an internal check failed')\n\n\n"
        "sys.exit(main(sys.argv[1:]))\n", encoding="utf-8")
    proc = subprocess.run([sys.executable, str(script), "eval", "bug", "--data", "d", "--out",
                           str(tmp_path / "b")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "Traceback (most recent call last)" in proc.stderr, proc.stderr
    assert proc.stderr.rstrip().endswith("ValueError: an internal check failed")
    assert "memtrain eval: error:" not in proc.stderr


@pytest.fixture()
def busy_port() -> Iterator[int]:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(1)
        yield sock.getsockname()[1]


def test_port_in_use_is_one_line_before_the_index_loads(busy_port: int, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture) -> None:
    rc = main(["serve-retriever", "--index", str(tmp_path / "index"), "--port", str(busy_port)])
    line = _error_line(capsys.readouterr().err, "serve-retriever")
    assert rc == 1
    assert (f"--host 127.0.0.1 --port {busy_port}: cannot serve there: Address already in use (EADDRINUSE)"
            in line)


def test_bad_host_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    rc = main(["serve-retriever", "--index", str(tmp_path / "index"), "--host", "no-such-host.invalid",
               "--port", "0"])
    line = _error_line(capsys.readouterr().err, "serve-retriever")
    assert rc == 1 and "--host no-such-host.invalid --port 0: cannot serve there:" in line
    assert "host lookup failed" in line


# --- item 5: budgets against the model's context ------------------------------------------------------------

def test_context_check_names_every_budget() -> None:
    paper = AgentConfig()  # 1024 + 5120 + 1024 + 1024 = 8192, the paper's context
    check_context_budget(paper, 8192)
    with pytest.raises(ValueError) as info:
        check_context_budget(paper, 8000)
    assert str(info.value) == (
        "agent.instruction_tokens 1024 + agent.chunk_tokens 5120 + agent.memory_tokens 1024 (memory read) + "
        "agent.memory_tokens 1024 (memory written) = 8192 tokens > the model's 8000 positions; lower "
        "agent.chunk_tokens to 4928 or less, or use a model with a longer context")
    long_answer = AgentConfig(chunk_tokens=100, memory_tokens=100, answer_tokens=4000)
    with pytest.raises(ValueError, match=r"agent.answer_tokens 4000 \(final turn\) = 5124 tokens > "
                                         r"the model's 4096 positions"):
        check_context_budget(long_answer, 4096)
    # proxy training and evaluation also hold an IMR turn (memory + chunk + answer): the largest one here
    with pytest.raises(ValueError, match=r"agent.answer_tokens 4000 \(IMR turn\) = 5224 tokens > "):
        check_context_budget(long_answer, 4096, imr=True)
    assert context_need(long_answer, imr=True)[0] == 1024 + 100 + 100 + 4000


def test_agent_fails_before_generating_when_budgets_exceed_the_context(tiny_model_dir: Path) -> None:
    from memtrain.models import load_tokenizer

    tok = load_tokenizer(str(tiny_model_dir))
    engine = ScriptedEngine(lambda prompt, sample: "x", tok)
    with pytest.raises(ValueError, match=r"= 8192 tokens > the model's 4096 positions"):
        MemoryAgent(engine, tok, AgentConfig(), context_length=4096)
    assert engine.calls == []


@pytest.fixture()
def short_context_model(tiny_model_dir: Path, tmp_path: Path) -> Path:
    """The tiny model with 2048 positions."""
    model = shutil.copytree(tiny_model_dir, tmp_path / "short")
    config = json.loads((model / "config.json").read_text())
    config["max_position_embeddings"] = 2048
    (model / "config.json").write_text(json.dumps(config))
    return model


def test_answer_refuses_budgets_over_the_model_context(short_context_model: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture) -> None:
    doc = tmp_path / "doc.txt"
    doc.write_text("The box is red. " * 200, encoding="utf-8")
    rc = main(["answer", "--model", str(short_context_model), "--document", str(doc), "--question",
               "What colour is the box?", "--chunk-tokens", "1024", "--memory-tokens", "512"])
    err = capsys.readouterr().err
    line = _error_line(err, "answer")
    assert rc == 1 and "chunk 1/" not in err  # nothing was generated
    assert ("agent.instruction_tokens 1024 + agent.chunk_tokens 1024 + agent.memory_tokens 512 (memory read) "
            "+ agent.memory_tokens 512 (memory written) = 3072 tokens > the model's 2048 positions") in line
    assert "budgets in force: chunk 1024, memory 512, answer 1024" in err


# --- item 10: progress and budget defaults ------------------------------------------------------------------

def test_budget_defaults_follow_model_and_device() -> None:
    assert default_budgets("smollm2-135m", "cpu")[0] == SMALL_CPU_BUDGETS
    assert default_budgets("HuggingFaceTB/SmolLM2-135M-Instruct", "cpu")[0] == SMALL_CPU_BUDGETS
    assert default_budgets("smollm2-135m", "cuda")[0] == PAPER_BUDGETS
    assert default_budgets("Qwen/Qwen2.5-7B-Instruct", "cpu")[0] == PAPER_BUDGETS
    assert default_budgets("Qwen/Qwen2.5-7B-Instruct", "cuda")[0] == PAPER_BUDGETS

    cfg = load_config(None, ["model.name=smollm2-135m", "agent.memory_tokens=200"])
    line = apply_default_budgets(cfg, None, device="cpu")
    assert (cfg.agent.chunk_tokens, cfg.agent.memory_tokens, cfg.agent.answer_tokens) == (1024, 200, 64)
    assert line == ("budgets in force: chunk 1024, memory 200, answer 64 (smollm2-135m on cpu: small budgets "
                    "for the embedded CPU model; set explicitly: memory_tokens)")
    qwen = load_config(None, ["model.name=Qwen/Qwen2.5-7B-Instruct"])
    assert "chunk 5120, memory 1024, answer 1024 (the paper's budgets" in apply_default_budgets(qwen, None,
                                                                                                 "cuda")
    from_file = load_config(None, ["model.name=smollm2-135m"])
    assert apply_default_budgets(from_file, "my.yaml", "cpu").endswith("(from my.yaml)")
    assert from_file.agent.chunk_tokens == 5120  # a config file is never second-guessed


def test_progress_is_rate_limited_and_has_rate_and_eta() -> None:
    from memtrain.agent.types import Turn

    now = [0.0]
    lines: list[str] = []
    progress = Progress("eval", total_docs=2, total_turns=6, interval_s=5, emit=lines.append,
                        clock=lambda: now[0])
    progress.enabled = True
    progress.batch([3, 3])

    def turn(kind: str) -> Turn:
        return Turn(kind=kind, step=0, prompt_ids=[], completion_ids=[1] * 10, logprobs=[], text="",
                    hit_cap=False)

    now[0] = 1.0
    progress.on_turn(0, turn("memory"), 3)  # the document has 3 chunks: 4 turns, not the 3 estimated
    assert lines == []  # within the interval
    now[0] = 6.0
    progress.on_turn(1, turn("memory"), 1)  # 2 turns: the total is 4 + 2
    assert lines == ["eval: turns 2/6, documents 0/2, 3.3 generated tokens/s, elapsed 0:00:06, ETA 0:00:12"]


@pytest.fixture()
def longqa_set(tmp_path: Path) -> Path:
    examples = [HotpotExample(id=f"q{i}", question=f"What is item {i}?", answer=f"value {i}",
                              paragraphs=tuple((f"T{i}-{j}", f"Paragraph {j} says {i * 10 + j}.")
                                               for j in range(4)),
                              gold_titles=(f"T{i}-0", f"T{i}-1")) for i in range(3)]
    out = tmp_path / "set"
    write_longqa(out, build_longqa(examples, [4], 2, seed=0), {})
    return out


def test_eval_logs_progress(longqa_set: Path, tmp_path: Path, tiny_model_dir: Path,
                            monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    from memtrain.models import load_tokenizer

    monkeypatch.delenv("MEMTRAIN_NO_PROGRESS", raising=False)
    monkeypatch.setenv("MEMTRAIN_PROGRESS_INTERVAL", "0")
    tok = load_tokenizer(str(tiny_model_dir))
    cfg = load_config(None, [f"model.name={tiny_model_dir}", "agent.chunk_tokens=40", "agent.memory_tokens=8",
                             "agent.answer_tokens=8"])
    caplog.set_level(logging.INFO, logger="memtrain")
    run_longqa_eval(cfg, longqa_set, tmp_path / "run", engine=ScriptedEngine(lambda p, s: "\\boxed{x}", tok),
                    tokenizer=tok, batch_size=1)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("longqa eval: turns ")]
    assert lines and "generated tokens/s" in lines[0] and "ETA" in lines[0]
    last = lines[-1].split(", ")
    done, total = last[0].removeprefix("longqa eval: turns ").split("/")
    assert done == total and last[1] == "documents 2/2"


def test_unwritable_qa_data_out_fails_before_reading_inputs(under_a_file: Path, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture) -> None:
    rc = main(["data", "longqa", "--hotpotqa", str(tmp_path / "absent.jsonl"),
               "--out", str(under_a_file / "s")])
    line = _error_line(capsys.readouterr().err, "data")
    assert rc == 1 and "cannot write there: Not a directory" in line


def test_train_checks_out_and_context_before_anything_loads(tmp_path: Path, tiny_model_dir: Path,
                                                             capsys: Any) -> None:
    """`memtrain train` fails in one line, before the data or model load, on an unwritable --out and on
    budgets that do not fit the model's positions."""
    from memtrain.cli.main import main

    blocker = tmp_path / "file"
    blocker.write_text("x")
    args = ["train", "--config", str(Path(__file__).parent.parent / "configs" / "memtrain_demo_cpu.yaml"),
            f"model.name={tiny_model_dir}", f"data.path={tmp_path / 'no-data'}"]
    assert main([*args, "--out", str(blocker / "run")]) == 1
    err = capsys.readouterr().err.strip()
    assert "--out" in err and "Not a directory" in err and len(err.splitlines()) == 1
    assert main([*args, "agent.chunk_tokens=9000", "--out", str(tmp_path / "run")]) == 1
    err = capsys.readouterr().err.strip()
    assert "agent.chunk_tokens 9000" in err and "8192 positions" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "run" / "config.yaml").exists()


def test_a_checkpoint_is_evaluated_with_the_budgets_it_was_trained_with(tmp_path: Path) -> None:
    """`eval proxy --model RUN/checkpoints/latest` next to the base model must read documents the same way:
    the defaults for a checkpoint are its training run's budgets, not the paper's."""
    from memtrain.config import load_config, save_config

    run = tmp_path / "run"
    step = run / "checkpoints" / "step_000005"
    step.mkdir(parents=True)
    (step / "meta.json").write_text(json.dumps({"model_name": "smollm2-135m"}))
    (run / "checkpoints" / "latest").symlink_to("step_000005")
    save_config(load_config(None, ["agent.chunk_tokens=256", "agent.memory_tokens=96",
                                   "agent.answer_tokens=32"]), run / "config.yaml")
    cfg = load_config(None, [f"model.name={run / 'checkpoints' / 'latest'}"])
    line = apply_default_budgets(cfg, device="cuda")
    assert (cfg.agent.chunk_tokens, cfg.agent.memory_tokens, cfg.agent.answer_tokens) == (256, 96, 32)
    assert "trained with" in line
