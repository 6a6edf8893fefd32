"""scripts/demo.sh refuses bad settings with one line naming the variable, before any work starts."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "demo.sh"


def _demo(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    # the HF engine, so that the script does not probe a vLLM environment first; a run directory of its own
    base = {**os.environ, "MEMTRAIN_DEMO_ENGINE": "hf", "MEMTRAIN_DEMO_DATA": str(tmp_path / "data"),
            "MEMTRAIN_DEMO_RUN": str(tmp_path / "run"), "PATH": "/usr/bin:/bin"}
    return subprocess.run(["bash", str(SCRIPT)], env={**base, **env}, capture_output=True, text=True,
                          timeout=60)


@pytest.mark.parametrize(("name", "value"), [("MEMTRAIN_DEMO_SEED", "one"), ("MEMTRAIN_DEMO_SEED", "-1"),
                                             ("MEMTRAIN_DEMO_HELDOUT_DOCS", "0"),
                                             ("MEMTRAIN_DEMO_HELDOUT_DOCS", "48docs")])
def test_demo_refuses_a_bad_setting_by_name(tmp_path: Path, name: str, value: str) -> None:
    proc = _demo(tmp_path, **{name: value})
    assert proc.returncode == 2, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"{name}={value}:") and "expected" in last
    assert not (tmp_path / "data").exists() and not (tmp_path / "run").exists()
