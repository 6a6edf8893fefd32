#!/usr/bin/env bash
# The CPU demo of the whole MemTrain loop, 6-7 minutes on 2 idle cores (docs/benchmarks.md):
#   1. fetch the embedded assets (SmolLM2-135M-Instruct, Wikipedia corpus, spaCy NER, MiniLM),
#   2. build a small proxy dataset (16 documents of 600-1100 tokens, 8 passages each) unless present,
#   3. train with GRPO on the joint E2E + IMR objective for 5 steps (configs/memtrain_demo_cpu.yaml) with
#      the vLLM engine when its environment installed (`make demo` tries), else the HF engine,
#   4. print the reward per step and write the curves.
# Re-running it continues/reuses what is there (the run is resumed; a finished run just prints its table).
# MEMTRAIN_DEMO_DATA / MEMTRAIN_DEMO_RUN move the dataset / run directory.
set -euo pipefail
cd "$(dirname "$0")/.."
# Idle OpenMP threads sleep instead of spinning: on a busy machine spinning torch threads slow every op down
# by an order of magnitude (measured: 18x for generation on 2 shared cores), on an idle one it costs ~nothing.
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"

# The fastest engine that works here: vLLM from its own environment (`make venv-vllm`), else the HF engine.
# MEMTRAIN_DEMO_ENGINE=hf|vllm chooses; each engine has its own run directory (it draws other samples).
ENGINE="${MEMTRAIN_DEMO_ENGINE:-}"
if [ -z "$ENGINE" ]; then
  ENGINE=hf
  if [ -x .venv-vllm/bin/memtrain ] && .venv-vllm/bin/python -c "import vllm" >/dev/null 2>&1; then
    ENGINE=vllm
  fi
fi
if [ "$ENGINE" = vllm ]; then
  PATH="$PWD/.venv-vllm/bin:$PATH"
fi
echo "engine: $ENGINE ($(command -v memtrain))"

DATA="${MEMTRAIN_DEMO_DATA:-runs/demo-data}"
RUN="${MEMTRAIN_DEMO_RUN:-runs/demo-$ENGINE}"
start=$(date +%s)

memtrain assets fetch

if [ ! -f "$DATA/manifest.json" ]; then
  # BM25 finds the related passages: a dense index over the whole corpus takes ~10 CPU-minutes to build once.
  memtrain data proxy --out "$DATA" --num-docs 16 --passages 8 --related 3 \
    --min-tokens 600 --max-tokens 1100 --retriever bm25
else
  echo "using the proxy dataset in $DATA"
fi

memtrain train --config configs/memtrain_demo_cpu.yaml "data.path=$DATA" "engine.kind=$ENGINE" --out "$RUN" \
  --resume

echo
echo "curves:"
memtrain plot "$RUN"
echo "sample trajectories: $RUN/samples.jsonl   TensorBoard: tensorboard --logdir $RUN/tensorboard"
echo "demo finished in $(( $(date +%s) - start ))s with the $ENGINE engine"
