"""scripts/gpu_check.py in --dry-run: the prepared GPU check's training parts pass on the CPU (the vLLM and
verl parts run in their own environments from .ci/run)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_training_parts_pass_on_the_cpu(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "--dry-run", "--only",
                           "native,fsdp2", "--results", str(tmp_path)], capture_output=True, text=True,
                          timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = {p.stem: json.loads(p.read_text()) for p in tmp_path.glob("*.json")}
    assert {k: r["status"] for k, r in results.items()} == {"native": "ok", "fsdp2": "ok"}, results
    assert "parameters DTensor" in results["fsdp2"]["detail"]  # really sharded, on one rank
    assert "sharded checkpoint, exported" in results["fsdp2"]["detail"]
