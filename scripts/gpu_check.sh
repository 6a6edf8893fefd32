#!/usr/bin/env bash
# One prepared GPU check (#26; what each part does: scripts/gpu_check.py). On a GPU machine, with no network:
#   bash scripts/gpu_check.sh             # ~2 minutes on one H100; prints one table, exits 1 if a part failed
#   bash scripts/gpu_check.sh --dry-run   # the same steps on the CPU (CI runs this)
# Each part runs under the Python that has its libraries: the project's venvs where they exist (.venv,
# .venv-vllm, .venv-verl), else $PYTHON (default python3, with src/ on its path: a GPU image with torch,
# transformers and peft needs nothing installed but this repository's pure-Python dependencies).
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=()
case "${1:-}" in
  --dry-run) DRY=(--dry-run) ;;
  "") ;;
  *) echo "usage: scripts/gpu_check.sh [--dry-run]" >&2; exit 2 ;;
esac
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
RESULTS="${GPU_CHECK_RESULTS:-$(mktemp -d)}"
pick() { if [ -x "$1/bin/python" ]; then echo "$1/bin/python"; else echo "${PYTHON:-python3}"; fi; }
MAIN="$(pick .venv)"
"$MAIN" scripts/gpu_check.py "${DRY[@]}" --results "$RESULTS" --only device,native,fsdp2
"$(pick .venv-vllm)" scripts/gpu_check.py "${DRY[@]}" --results "$RESULTS" --only vllm
"$(pick .venv-verl)" scripts/gpu_check.py "${DRY[@]}" --results "$RESULTS" --only verl
"$MAIN" scripts/gpu_check.py --summary "$RESULTS"
