#!/usr/bin/env bash
# One prepared GPU check (#26; what each part does: scripts/gpu_check.py). On a GPU machine, with no network:
#   bash scripts/gpu_check.sh             # ~2 minutes on one H100; prints one table, exits 1 if a part failed
#   bash scripts/gpu_check.sh --dry-run   # the same steps on the CPU (CI runs this, a step at a time)
#   bash scripts/gpu_check.sh vllm summary  # named steps only (main, vllm, verl, summary)
# Each part runs under the Python that has its libraries: the project's venvs where they exist (.venv,
# .venv-vllm, .venv-verl), else $PYTHON (default python3, with src/ on its path: a GPU image with torch,
# transformers and peft needs nothing installed but this repository's pure-Python dependencies).
set -uo pipefail
cd "$(dirname "$0")/.."
usage="usage: scripts/gpu_check.sh [--dry-run] [main|vllm|verl|summary ...]"
DRY=()
STEPS=()
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY=(--dry-run) ;;
    main|vllm|verl|summary) STEPS+=("$arg") ;;
    *) echo "$usage" >&2; exit 2 ;;
  esac
done
# No step named: all of them. Naming steps runs them alone, sharing $GPU_CHECK_RESULTS, so that CI can remove
# an environment once its part has run (.ci/run); `summary` then prints the table of every part.
[ ${#STEPS[@]} -gt 0 ] || STEPS=(main vllm verl summary)
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
RESULTS="${GPU_CHECK_RESULTS:-$(mktemp -d)}"
pick() { if [ -x "$1/bin/python" ]; then echo "$1/bin/python"; else echo "${PYTHON:-python3}"; fi; }
MAIN="$(pick .venv)"
for step in "${STEPS[@]}"; do
  case "$step" in
    main) "$MAIN" scripts/gpu_check.py "${DRY[@]}" --results "$RESULTS" --only device,native,fsdp2 ;;
    vllm) "$(pick .venv-vllm)" scripts/gpu_check.py "${DRY[@]}" --results "$RESULTS" --only vllm ;;
    verl) "$(pick .venv-verl)" scripts/gpu_check.py "${DRY[@]}" --results "$RESULTS" --only verl ;;
    summary) "$MAIN" scripts/gpu_check.py --summary "$RESULTS" || exit 1 ;;
  esac
done
