"""Failure and resume: copied run dirs, half-copied checkpoints, non-finite configs, unloadable models,
damaged datasets, a hostile retriever client, leaked temp dirs, permissions, fsync and safe unpickling."""

from __future__ import annotations

import http.client
import json
import os
import pickle
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import save_file

from memtrain import io as mio
from memtrain.cli.main import main
from memtrain.config import ConfigError, load_config
from memtrain.data.dataset import DatasetError, load_rows, require_columns, write_dataset
from memtrain.errors import UserError
from memtrain.io import read_jsonl
from memtrain.models import ModelLoadError, load_policy, load_tokenizer
from memtrain.rl import checkpoint as ck
from memtrain.rl.metrics import truncate_after
from memtrain.rl.trainer import train
from train_helpers import config_yaml, tiny_config, write_proxy_dataset

SCHEMA = pa.schema([("id", pa.string()), ("question", pa.string()), ("answers", pa.list_(pa.string()))])

# --- 1. resume from the step directories, never over unaccounted history ------------------------------


def _fake_checkpoint(root: Path, step: int) -> Path:
    """A complete-looking step dir (meta.json lists the sizes of its files), written like save_checkpoint."""
    d = root / ck.step_dir_name(step)
    d.mkdir(parents=True)
    save_file({"w": torch.ones(4)}, str(d / "model.safetensors"))
    torch.save({"version": ck.STATE_VERSION, "step": step}, d / ck.STATE_FILE)
    files = {p.name: p.stat().st_size for p in d.iterdir()}
    (d / ck.META_FILE).write_text(json.dumps({"step": step, "files": files}))
    return d


def test_latest_found_from_step_dirs_when_the_link_is_lost_or_copied(tmp_path: Path) -> None:
    run = tmp_path / "run"
    root = run / "checkpoints"
    _fake_checkpoint(root, 1)
    _fake_checkpoint(root, 2)
    # no `latest` at all (rsync -r drops symlinks): still the newest complete one, not a restart
    assert ck.latest_checkpoint(run) == root / "step_000002"
    # `latest` as a real directory copy (cp -rL), then replaced by a symlink on the next save
    shutil.copytree(root / "step_000002", root / "latest")
    assert ck.resume_checkpoint(run) == root / "step_000002"
    ck.point_latest(root, "step_000002")
    assert (root / "latest").is_symlink()
    # a half-copied newer checkpoint (weights truncated) is skipped, not resumed from
    third = _fake_checkpoint(root, 3)
    size = (third / "model.safetensors").stat().st_size
    (third / "model.safetensors").write_bytes(b"w" * 10)
    assert ck.incomplete_reason(third) == f"model.safetensors has 10 bytes, {size} expected"
    assert ck.resume_checkpoint(run) == root / "step_000002"
    # checkpoints were written but none is complete: refuse rather than restart over the history
    for d in (root / "step_000001", root / "step_000002"):
        (d / "model.safetensors").unlink()
    (root / "latest").unlink()
    with pytest.raises(FileNotFoundError, match=r"no complete checkpoint .*step_000003: model.safetensors"):
        ck.resume_checkpoint(run)
    # no checkpoint dir at all, but metrics.jsonl says one was due after step 2
    shutil.rmtree(root)
    (run / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2}\n{"step": 3}\n')
    with pytest.raises(FileNotFoundError, match="records step 2, after which a checkpoint was written"):
        ck.resume_checkpoint(run, checkpoint_every=2)
    assert ck.resume_checkpoint(run, checkpoint_every=5) is None  # killed before its first checkpoint
    # step 2's row is written before its checkpoint: killed while saving the first one, the run resumes
    (run / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2}\n')
    assert ck.resume_checkpoint(run, checkpoint_every=2) is None


def test_truncated_metrics_rows_are_moved_not_erased(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": s / 10}) + "\n" for s in (1, 2, 3)))
    assert truncate_after(path, 1) == 2
    assert [r["step"] for r in read_jsonl(path)] == [1]
    dropped = read_jsonl(tmp_path / "metrics.dropped.jsonl")
    assert [(r["step"], r["dropped_on_resume_from_step"]) for r in dropped] == [(2, 1), (3, 1)]


def test_resume_of_a_copied_run_dir_continues_and_keeps_history(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    data = write_proxy_dataset(tmp_path / "data")
    run = tmp_path / "run"
    train(tiny_config(tiny_model_dir, data, ["train.steps=2", "train.keep_last=2"]), run)
    before = read_jsonl(run / "metrics.jsonl")
    # `cp -rL`: latest becomes a directory; `rsync -r` (no -l): latest is gone
    copied, synced = tmp_path / "copied", tmp_path / "synced"
    shutil.copytree(run, copied, symlinks=False)
    shutil.copytree(run, synced, symlinks=True)
    (synced / "checkpoints" / "latest").unlink()
    for target in (copied, synced):
        assert (target / "checkpoints" / "latest").is_dir() == (target is copied)
        train(tiny_config(tiny_model_dir, data, ["train.steps=3", "train.keep_last=2"]), target, resume=True)
        rows = read_jsonl(target / "metrics.jsonl")
        assert [r["step"] for r in rows] == [1, 2, 3]
        assert rows[:2] == before  # steps 1-2 were not redone: the history is the original run's
        steps = sorted(p.name for p in (target / "checkpoints").glob("step_*"))
        assert steps == ["step_000002", "step_000003"]
        assert os.readlink(target / "checkpoints" / "latest") == "step_000003"
        # the resumed checkpoint was read with weights_only=True (safe unpickling) and still resumes
        assert ck.load_trainer_state(target / "checkpoints" / "step_000003")["step"] == 3


# --- 9. checkpoints: safe loading (old files too), fsync, permissions ----------------------------------


def test_trainer_state_loads_safely_old_format_too(tmp_path: Path) -> None:
    old = tmp_path / "old"
    old.mkdir()
    # written by the previous code: numpy's RNG state as an ndarray inside a tuple
    torch.save({"version": ck.STATE_VERSION, "step": 4, "rng": ck.rng_state()}, old / ck.STATE_FILE)
    state = ck.load_trainer_state(old)
    ck.set_rng_state(state["rng"])
    assert state["step"] == 4

    class Evil:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    evil = tmp_path / "evil"
    evil.mkdir()
    with open(evil / ck.STATE_FILE, "wb") as fh:
        pickle.dump({"version": ck.STATE_VERSION, "x": Evil()}, fh)
    with pytest.raises(ValueError, match=r"trainer_state.pt: cannot load the trainer state"):
        ck.load_trainer_state(evil)
    assert not (tmp_path / "pwned").exists()


def test_checkpoint_files_are_fsynced_and_readable_by_others(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from memtrain.rl.optim import build_optimizer, build_scheduler

    synced: list[str] = []
    real_fsync = os.fsync

    def spy(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", spy)
    old_mask = os.umask(0o022)
    try:
        model = load_policy(str(tiny_model_dir), "float32", "cpu")
        opt = build_optimizer(model, load_config(None, []).optim)
        path = ck.save_checkpoint(tmp_path / "run", 1, model, load_tokenizer(str(tiny_model_dir)), opt,
                                  build_scheduler(opt, 1), {}, keep_last=1, model_name="tiny")
    finally:
        os.umask(old_mask)
    names = {Path(p).name for p in synced}
    assert {"model.safetensors", ck.STATE_FILE, ck.META_FILE}.issubset(names)
    assert str(path.parent) in synced  # the rename into checkpoints/ was made durable
    assert path.stat().st_mode & 0o777 == 0o755
    assert (path / ck.META_FILE).stat().st_mode & 0o777 == 0o644


# --- 9. io: umask, stale temp dirs ---------------------------------------------------------------------


def test_atomic_writes_follow_the_umask(tmp_path: Path) -> None:
    old_mask = os.umask(0o002)
    try:
        mio.atomic_write_json(tmp_path / "a.json", {"x": 1})
        with mio.atomic_dir(tmp_path / "d") as tmp:
            (tmp / "f").write_text("x")
    finally:
        os.umask(old_mask)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o664
    assert (tmp_path / "d").stat().st_mode & 0o777 == 0o775


def test_stale_temp_dirs_of_dead_writers_are_cleaned(tmp_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    host = mio._host()
    dead = tmp_path / f".tmp-ds-p{proc.pid}@{host}.abc"
    alive = tmp_path / f".tmp-ds-p{os.getpid()}@{host}.def"
    other_host_fresh = tmp_path / f".tmp-ds-p{proc.pid}@elsewhere.ghi"
    old_unknown = tmp_path / ".tmp-ds-xyz"
    other_target = tmp_path / ".tmp-other-p1@x.y"
    for d in (dead, alive, other_host_fresh, old_unknown, other_target):
        d.mkdir()
    day_ago = time.time() - 25 * 3600
    os.utime(old_unknown, (day_ago, day_ago))
    write_dataset(tmp_path / "ds", [{"id": "a", "question": "q", "answers": ["x"]}],
                  SCHEMA, "toy")
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == sorted([alive.name, other_host_fresh.name, other_target.name, "ds"])


# --- 2. non-finite config values ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("item", "where"),
    [("optim.lr=inf", "optim.lr"), ("optim.lr=.nan", "optim.lr"), ("rl.temperature=-inf", "rl.temperature"),
     ("optim.betas=[0.9, .inf]", "optim.betas.1"), ("optim.lr=1e999", "optim.lr")],
)
def test_non_finite_config_values_are_rejected(item: str, where: str) -> None:
    with pytest.raises(ConfigError, match=rf"{where}: Input should be a finite number \(got"):
        load_config(None, [item])


def test_non_finite_assignment_is_rejected() -> None:
    config = load_config(None, [])
    with pytest.raises(ValueError, match="finite number"):
        config.optim.lr = float("inf")


# --- 3. model loading: one line, never the hub for a path -----------------------------------------------


@pytest.fixture()
def no_hub(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any from_pretrained of something that is not an existing directory fails the test."""
    import transformers

    for cls in (transformers.AutoModelForCausalLM, transformers.AutoTokenizer):
        real = cls.from_pretrained

        def guarded(name, *args, _real=real, **kwargs):  # type: ignore[no-untyped-def]
            assert os.path.isdir(name), f"{name!r} went to the hub"
            return _real(name, *args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", guarded)


@pytest.mark.usefixtures("no_hub")
def test_model_paths_fail_in_one_line(tiny_model_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "noweights").mkdir()
    shutil.copy(tiny_model_dir / "config.json", tmp_path / "noweights")
    cases = [
        (str(tmp_path / "missing"), "does not exist"),
        ("./no/such/dir", "does not exist"),
        ("runs/x/checkpoints/latest", "does not exist"),
        ("~/no-such-model-dir-xyz", "does not exist"),
        (str(tmp_path / "empty"), "no config.json"),
        (str(tmp_path / "noweights"), "no weights; expected one of model.safetensors"),
    ]
    for name, message in cases:
        with pytest.raises(ModelLoadError, match=re.escape(message)) as info:
            load_policy(name, "float32", "cpu")
        assert "\n" not in str(info.value) and name.lstrip("~/") in str(info.value)
    with pytest.raises(ModelLoadError, match="empty: no tokenizer files"):
        load_tokenizer(str(tmp_path / "empty"))
    corrupt = tmp_path / "corrupt"
    shutil.copytree(tiny_model_dir, corrupt)
    weights = corrupt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ModelLoadError, match=rf"{corrupt}: cannot load the model \(SafetensorError") as info:
        load_policy(str(corrupt), "float32", "cpu")
    assert "\n" not in str(info.value)


def test_unreachable_hub_name_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    import transformers

    def offline(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files, and couldn't find "
                      "them in the cached files.\nCheck your internet connection or see ...")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", offline)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match=r"'org/model': not a local directory.*HF_HUB_OFFLINE") as info:
        load_tokenizer("org/model")
    assert "\n" not in str(info.value)


# --- 6. dataset integrity --------------------------------------------------------------------------------

def _dataset(path: Path, n: int = 300) -> Path:
    rows = [{"id": f"r{i}", "question": f"question {i} " * 5, "answers": [f"a{i}"]} for i in range(n)]
    write_dataset(path, rows, SCHEMA, "toy", shard_size=n)
    return path


def test_modified_and_damaged_shards_are_one_line_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ds = _dataset(tmp_path / "ds")
    shard = ds / "shard-00000.parquet"
    good = shard.read_bytes()
    # replaced by rows of the same shape (same count, same byte size): the footer hash differs
    other = [{"id": f"s{i}", "question": f"question {i} " * 5, "answers": [f"b{i}"]} for i in range(300)]
    pq.write_table(pa.Table.from_pylist(other, schema=SCHEMA), shard, compression="zstd",
                   write_page_checksum=True)
    assert shard.stat().st_size == len(good)
    with pytest.raises(DatasetError, match=r"shard-00000.parquet: parquet footer does not match the manifes"):
        load_rows(ds)
    # one flipped byte in the data pages: same size and footer; page CRCs name the shard in one line
    flipped = bytearray(good)
    flipped[len(good) // 3] ^= 0xFF
    shard.write_bytes(bytes(flipped))
    with pytest.raises(DatasetError, match=r"shard-00000.parquet: cannot read rows") as info:
        load_rows(ds)
    assert "\n" not in str(info.value)
    with pytest.raises(DatasetError, match="sha256 does not match"):
        load_rows(ds, verify="full")
    monkeypatch.setenv("MEMTRAIN_VERIFY_DATA", "full")
    with pytest.raises(DatasetError, match="sha256 does not match"):
        load_rows(ds)
    monkeypatch.delenv("MEMTRAIN_VERIFY_DATA")
    shard.write_bytes(good[:-100])  # truncated
    with pytest.raises(DatasetError, match=r"bytes, but the manifest says \d+"):
        load_rows(ds)


def test_old_manifest_without_integrity_fields_still_loads(tmp_path: Path) -> None:
    ds = _dataset(tmp_path / "ds", n=5)
    manifest = json.loads((ds / "manifest.json").read_text())
    for shard in manifest["shards"]:
        del shard["size"], shard["footer_sha256"], shard["sha256"]
    (ds / "manifest.json").write_text(json.dumps(manifest))
    assert len(load_rows(ds, verify="full")) == 5


def test_require_columns_reads_no_rows(tmp_path: Path) -> None:
    ds = _dataset(tmp_path / "ds", n=5)
    require_columns(ds, ["id", "question"], "longqa")
    with pytest.raises(DatasetError, match=r"has no column 'context', which task 'proxy' needs"):
        require_columns(ds, ["question", "context"], "proxy")
    manifest = json.loads((ds / "manifest.json").read_text())
    del manifest["columns"]  # falls back to a shard's schema
    (ds / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DatasetError, match=r"built for task 'toy'\) has no column 'entity_spans'"):
        require_columns(ds, ["entity_spans"], "proxy")


# --- 8. retriever service -------------------------------------------------------------------------------


@pytest.fixture()
def small_server(tmp_path: Path) -> Iterator[object]:
    from memtrain.retrieval.server import RetrieverServer
    from memtrain.retrieval.service import Retriever

    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"id": str(i), "contents": f'"T{i}"\nword{i} text'}) + "\n"
                              for i in range(4)))
    with RetrieverServer(Retriever.build(corpus, tmp_path / "idx"), "127.0.0.1", 0, timeout_s=1.0,
                         max_connections=8, token=None) as srv:
        yield srv


def _raw(srv: object, data: bytes) -> tuple[int, str, bytes]:
    with socket.create_connection((srv.host, srv.port), timeout=10) as s:  # type: ignore[attr-defined]
        s.sendall(data)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    status = int(head.split()[1])
    ctype = next((h.split(b":", 1)[1].strip().decode() for h in head.split(b"\r\n")
                  if h.lower().startswith(b"content-type")), "")
    return status, ctype, body


def _post_body(body: bytes) -> bytes:
    return (b"POST /search HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\n"
            b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)


def test_hostile_bodies_and_methods_get_json_4xx(small_server: object) -> None:
    cases = [
        (_post_body(b"[" * 100_000), 400, "nested too deeply"),
        (_post_body(b'{"queries": ["a"], "k": ' + b"9" * 5000 + b"}"), 400, "not valid JSON"),
        (b"PUT /search HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n", 405, "not allowed"),
        (b"GARBAGE\r\n\r\n", 400, "Bad request"),
        (b"GET /health HTTP/1.1\r\n\r\n", 400, "Bad request"),  # no Host header
    ]
    for raw, status, message in cases:
        got, ctype, body = _raw(small_server, raw)
        assert (got, ctype.split(";")[0]) == (status, "application/json"), raw[:40]
        assert message in json.loads(body)["error"]


def _closed_unanswered(sock: socket.socket) -> bool:
    sock.settimeout(10)
    try:
        return sock.recv(100) == b""
    except ConnectionResetError:
        return True


def test_idle_sockets_are_timed_out_and_threads_bounded(small_server: object) -> None:
    host, port = small_server.host, small_server.port  # type: ignore[attr-defined]
    # a slow client dribbling a request is cut at the request deadline (1 s), not kept alive by each byte
    slow = socket.create_connection((host, port), timeout=10)
    start = time.monotonic()
    try:
        for ch in b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n":
            slow.sendall(bytes([ch]))
            time.sleep(0.15)
    except OSError:
        pass
    assert _closed_unanswered(slow) and time.monotonic() - start < 8
    slow.close()
    before = threading.active_count()
    idle = [socket.create_connection((host, port), timeout=10) for _ in range(30)]
    time.sleep(0.3)
    assert threading.active_count() <= before  # one event loop: no thread per socket
    for s in idle:
        s.settimeout(10)
        s.recv(100)  # closed by the server (or answered 503 past max_connections)
        s.close()
    conn = http.client.HTTPConnection(host, port, timeout=10)
    conn.request("GET", "/health")
    assert conn.getresponse().status == 200  # still serving
    conn.close()


def test_token_is_required_and_sent_by_the_client(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from memtrain.retrieval.server import RetrieverServer
    from memtrain.retrieval.service import Retriever, RetrieverError, is_loopback, open_retriever

    corpus = tmp_path / "c.jsonl"
    corpus.write_text(json.dumps({"id": "0", "contents": '"Berlin"\nBerlin is a city'}) + "\n")
    srv = RetrieverServer(Retriever.build(corpus, tmp_path / "idx"), "127.0.0.1", 0, token="s3cret").start()
    try:
        monkeypatch.delenv("MEMTRAIN_RETRIEVER_TOKEN", raising=False)
        with pytest.raises(RetrieverError, match=r"HTTP 401.*MEMTRAIN_RETRIEVER_TOKEN"):
            open_retriever(srv.url).health()  # type: ignore[union-attr]
        monkeypatch.setenv("MEMTRAIN_RETRIEVER_TOKEN", "wrong")
        with pytest.raises(RetrieverError, match="HTTP 401"):
            open_retriever(srv.url).search(["Berlin"], 1)
        monkeypatch.setenv("MEMTRAIN_RETRIEVER_TOKEN", "s3cret")
        assert open_retriever(srv.url).search(["Berlin"], 1)[0][0].title == "Berlin"
    finally:
        srv.stop()
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.1.2.3") and not is_loopback("myhost")


# --- 9. cache corruption names the file ------------------------------------------------------------------


def test_damaged_caches_name_the_file_and_say_delete(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from memtrain import assets
    from memtrain.retrieval.service import Retriever

    monkeypatch.setenv("MEMTRAIN_HOME", str(tmp_path / "home"))
    d = assets.asset_dir("wikipedia-vital")
    d.mkdir(parents=True)
    (d / assets.ASSETS["wikipedia-vital"].entry).write_text("{}")
    (d / assets.MARKER).write_text("{trunc")
    with pytest.raises(assets.AssetError, match=r"asset\.json: damaged asset cache file .*delete"):
        assets.status("wikipedia-vital")
    corpus = tmp_path / "c.jsonl"
    corpus.write_text(json.dumps({"id": "0", "contents": '"A"\nalpha'}) + "\n")
    Retriever.build(corpus, tmp_path / "idx")
    (tmp_path / "idx" / "retriever.json").write_text("{oops")
    with pytest.raises(ValueError, match=r"retriever\.json: damaged retriever index .*delete"):
        Retriever.open(tmp_path / "idx")
    with pytest.raises(ValueError, match=r"retriever\.json: damaged retriever index cache .*delete"):
        Retriever.for_corpus(corpus, tmp_path / "idx")


# --- 11. validation is held out; user errors are one line (#24) ------------------------------------------


def test_validation_on_the_training_set_is_refused(tiny_model_dir: Path, tmp_path: Path) -> None:
    data = write_proxy_dataset(tmp_path / "data")
    run = tmp_path / "run"
    copy = tmp_path / "copy"  # the same rows under another directory
    shutil.copytree(data, copy)
    for held_out in (data, copy):
        config = tiny_config(tiny_model_dir, data, ["train.steps=1", f"train.eval_data={held_out}"])
        with pytest.raises(UserError, match=r"is not held out from data\.path=.*: 4 row id\(s\) and 4 row "
                                            r"text\(s\) in common.*--exclude-from"):
            train(config, run)
        assert not (run / "config.yaml").exists()
    ok = tiny_config(tiny_model_dir, data, ["train.steps=1", f"train.eval_data={copy}",
                                            "train.allow_eval_overlap=true", "train.tensorboard=false"])
    train(ok, run)
    assert (run / "eval" / "step_000001").is_dir()


def test_user_errors_are_one_line(tiny_model_dir: Path, tmp_path: Path,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    binary = tmp_path / "config.yaml"
    binary.write_bytes(bytes(range(256)))
    assert main(["train", "--config", str(binary), "--out", str(tmp_path / "run")]) == 1
    assert capsys.readouterr().err.strip() == (
        f"memtrain train: error: config file {binary} is not UTF-8 text (a binary file?): expected YAML")
    with pytest.raises(ConfigError, match=r"steps=true: expected an integer, not a boolean"):
        load_config(None, ["train.steps=true"])
    with pytest.raises(ConfigError, match=r"lr=false: expected a number, not a boolean"):
        load_config(None, ["optim.lr=false"])
    assert main(["answer", "--model", str(tiny_model_dir), "--document", str(tmp_path),
                 "--question", "Who?"]) == 1
    assert capsys.readouterr().err.strip().endswith(f"--document {tmp_path}: a directory; expected a UTF-8 "
                                                    "text file")


@pytest.mark.parametrize("failure", [OSError(28, "No space left on device"),
                                     RuntimeError("basic_ios::clear: iostream error")])
def test_a_full_disk_while_saving_a_checkpoint_is_one_line(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
    failure: Exception
) -> None:
    """What safetensors and torch.save raise on a full disk (the first save, then the retry) becomes one line
    naming the checkpoint and the free space."""
    data = write_proxy_dataset(tmp_path / "data")
    config = config_yaml(tiny_model_dir, data, tmp_path / "c.yaml")

    def full(*args: object, **kwargs: object) -> None:
        raise failure

    monkeypatch.setattr(ck.torch, "save", full)
    monkeypatch.setattr(mio, "_LOW_SPACE_BYTES", 0)  # the message alone must be recognised
    assert main(["train", "--config", str(config), "--out", str(tmp_path / "run"), "train.steps=1"]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert re.fullmatch(r"memtrain train: error: .*step_000001: no space left on device writing checkpoint "
                        r"step_000001, \d+ MiB free; free space and rerun \(a run resumes from its last "
                        r"checkpoint\) \(ENOSPC\)", err), err


def test_the_sync_check_relative_to_the_first_sync_tells_a_stale_engine_from_noise() -> None:
    """engine.sync_check_ratio (item 7 of #24): an engine whose gap to the trainer grows with training (it
    follows a quarter of the way: layers not reloaded) fails at 3x the first sync's noise, one that serves the
    first weights bit for bit fails once the trainer moved beyond that noise; an engine that follows with
    noise of the first sync's size passes however far the trainer moved."""
    from memtrain.engines.vllm import _Baseline, relative_failure

    gen = torch.Generator().manual_seed(0)
    trainer0 = -torch.rand(40, generator=gen) * 5
    noise = lambda: torch.randn(40, generator=gen) * 0.04  # noqa: E731  (bf16-like: mean |.| ~0.03)
    engine0 = trainer0 + noise()
    base = _Baseline(engine0, trainer0, float((engine0 - trainer0).abs().mean()))
    for step in (0.05, 0.3, 1.0):  # the trainer's log-probs move by step nats per token
        trainer = trainer0 + step * torch.randn(40, generator=gen).sign()
        for _ in range(20):
            assert relative_failure(base, trainer + 1.5 * noise(), trainer, 3.0, 5e-3) is None  # follows
        stale = relative_failure(base, engine0, trainer, 3.0, 5e-3)  # kept the first weights
        assert stale is not None and ("bit-identical" in stale if step < 0.3 else "3x" in stale)
        quarter = trainer0 + (trainer - trainer0) / 4 + noise()  # a quarter of the way
        why = relative_failure(base, quarter, trainer, 3.0, 5e-3)
        assert step < 0.3 or (why is not None and "follows only part" in why)
    inside = trainer0 + 0.02 * torch.randn(40, generator=gen).sign()
    assert relative_failure(base, engine0, inside, 3.0, 5e-3) is None  # within the noise: nothing to judge
