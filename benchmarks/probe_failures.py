"""Replay the failure list of #24 ("nothing silent"): each item is a test that runs the failure for real (a
damaged checkpoint, a rebuilt data set, a SIGKILLed run, an exploding learning rate, a stale vLLM sync, a
full disk...) and checks the run stops or says so in one line. Prints one row per item and exits 1 if any
failed; the vLLM items run in the vLLM environment when it exists.

    python benchmarks/probe_failures.py
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"

# (item, what must not happen silently, pytest node ids, needs the vLLM environment)
ITEMS = [
    ("1", "a damaged checkpoint of the right size is resumed",
     ["tests/test_faults.py::test_damaged_checkpoint_of_the_right_size_is_not_resumed"], False),
    ("2", "a resume trains on a rebuilt data set",
     ["tests/test_faults.py::test_resume_on_a_rebuilt_dataset_is_refused"], False),
    ("3", "the updates after the last checkpoint are lost when the last step is skipped",
     ["tests/test_faults.py::test_the_last_step_is_saved_even_when_it_is_skipped"], False),
    ("4", "validation on the training set",
     ["tests/test_reliability.py::test_validation_on_the_training_set_is_refused"], False),
    ("5", "a damaged metrics row disappears",
     ["tests/test_faults.py::test_a_damaged_metrics_row_is_kept_not_dropped"], False),
    ("6", "an update that explodes but stays finite is kept",
     ["tests/test_trainer.py::test_exploding_updates_are_undone_and_never_saved"], False),
    ("7", "a partly stale vLLM sync passes the self-check",
     ["tests/test_reliability.py::test_the_sync_check_relative_to_the_first_sync_tells_a_stale_engine_from_noise"],
     False),
    ("7", "(vLLM) a dropped LoRA delta, a refused or silent prefix-cache reset",
     ["tests/test_vllm_engine.py::test_a_dropped_lora_delta_stops_a_bf16_run",
      "tests/test_vllm_engine.py::test_a_refused_prefix_cache_reset_stops_the_run",
      "tests/test_vllm_engine.py::test_a_prefix_cache_left_stale_is_caught_by_the_decode_probe"], True),
    ("8", "a token id the tokenizer does not know reaches the next prompt",
     ["tests/test_agent.py::test_token_ids_the_tokenizer_does_not_know_never_reach_the_next_prompt"], False),
    ("one line", "binary config, booleans as numbers, a directory as --document",
     ["tests/test_reliability.py::test_user_errors_are_one_line"], False),
    ("one line", "a full disk while a checkpoint is written",
     ["tests/test_reliability.py::test_a_full_disk_while_saving_a_checkpoint_is_one_line"], False),
]


def main() -> int:
    rows, failed = [], 0
    for item, what, nodes, vllm in ITEMS:
        if vllm and not VLLM_PYTHON.exists():
            rows.append((item, what, "skipped (no .venv-vllm: make venv-vllm)"))
            continue
        python = str(VLLM_PYTHON) if vllm else sys.executable
        proc = subprocess.run([python, "-m", "pytest", "-q", "-p", "no:cacheprovider", *nodes], cwd=ROOT,
                              capture_output=True, text=True, check=False)
        summary = (proc.stdout.strip().splitlines() or ["no output"])[-1]
        ok = proc.returncode == 0 and "skipped" not in summary
        failed += not ok
        rows.append((item, what, ("caught: " if ok else "NOT CAUGHT: ") + summary))
    print("| #24 item | must not pass silently | result |\n|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
