#!/usr/bin/env bash
# The CPU demo of the whole MemTrain loop on the embedded defaults (docs/benchmarks.md has its timings):
#   1. fetch the embedded assets (SmolLM2-135M-Instruct, Wikipedia corpus, spaCy NER, MiniLM),
#   2. build a small proxy training set and a held-out one that shares no Wikipedia article with it,
#   3. train with GRPO on the joint E2E + IMR objective (configs/memtrain_demo_cpu.yaml) with the vLLM
#      engine when its environment installed (`make demo` tries), else the HF engine, validating on the
#      held-out set (E2E + IMR, greedy, bootstrap 95% intervals) before the first step, every
#      train.eval_every steps and after the last (train.eval_data: RUN/eval/step_N),
#   4. print the held-out base (step 0) vs trained (last step) table side by side (the paired difference with
#      its 95% interval), the reward and validation per step, and the paths of the curves.
# Re-running it continues/reuses what is there (data, the run and its validations are resumed or reused).
# MEMTRAIN_DEMO_SEED (default 1) seeds both the data (training and held-out sets) and the training run: seeds
# 1, 2 and 3 are the replicates docs/benchmarks.md reports, 4 the recipe's pilot and 5 a fresh check
# (benchmarks/bench_seeds.py runs and pools them).
# MEMTRAIN_DEMO_DATA / MEMTRAIN_DEMO_RUN move the data / run directories; MEMTRAIN_DEMO_STEPS sets the steps,
# MEMTRAIN_DEMO_HELDOUT_DOCS the size of the held-out set (default 48);
# MEMTRAIN_DEMO_CONFIG runs another recipe; MEMTRAIN_DEMO_SET adds space-separated KEY=VALUE overrides to it
# (benchmarks/bench_seeds.py --set compares such a variant with the recipe).
set -euo pipefail
cd "$(dirname "$0")/.."
# Idle OpenMP threads sleep instead of spinning: on a busy machine spinning torch threads slow every op down
# (measured: 18x for HF generation on 2 shared cores; vLLM rollouts 1.8x with one core taken), on an idle one
# spinning is 1.14x faster for the rollouts (docs/benchmarks.md): OMP_WAIT_POLICY=ACTIVE make demo there.
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

# (new names for each recipe: a run of an earlier demo recipe cannot be resumed with this one)
SEED="${MEMTRAIN_DEMO_SEED:-1}"
case "$SEED" in ''|*[!0-9]*) echo "MEMTRAIN_DEMO_SEED=$SEED: expected a non-negative integer" >&2; exit 2;; esac
# 48 held-out documents: two validations of ~110 s each on 2 cores (64 took ~150 s; docs/benchmarks.md)
HELDOUT_DOCS="${MEMTRAIN_DEMO_HELDOUT_DOCS:-48}"
case "$HELDOUT_DOCS" in ''|*[!0-9]*|0*) echo "MEMTRAIN_DEMO_HELDOUT_DOCS=$HELDOUT_DOCS: expected a positive integer" >&2; exit 2;; esac
DATA="${MEMTRAIN_DEMO_DATA:-runs/demo-s$SEED-data}"
HELDOUT="$DATA-heldout$HELDOUT_DOCS"  # a held-out set of another size is another set
RUN="${MEMTRAIN_DEMO_RUN:-runs/demo-s$SEED-h$HELDOUT_DOCS-$ENGINE}"
STEPS="${MEMTRAIN_DEMO_STEPS:-}"
CONFIG="${MEMTRAIN_DEMO_CONFIG:-configs/memtrain_demo_cpu.yaml}"
start=$(date +%s)

memtrain assets fetch

# Small documents (4 passages, 300-500 tokens: 3-4 chunks of 128); BM25 finds the related passages (a dense
# index over the whole corpus takes ~10 CPU-minutes to build once).
PROXY=(--passages 4 --related 2 --min-tokens 300 --max-tokens 500 --retriever bm25)
[ -f "$DATA/manifest.json" ] || memtrain data proxy --out "$DATA" --num-docs 64 --seed "$SEED" "${PROXY[@]}"
[ -f "$HELDOUT/manifest.json" ] || memtrain data proxy --out "$HELDOUT" --num-docs "$HELDOUT_DOCS" \
  --seed "$((SEED + 1000))" --exclude-from "$DATA" "${PROXY[@]}"

memtrain train --config "$CONFIG" "data.path=$DATA" "train.eval_data=$HELDOUT" "engine.kind=$ENGINE" \
  "train.seed=$SEED" ${MEMTRAIN_DEMO_SET:-} ${STEPS:+"train.steps=$STEPS"} ${STEPS:+"train.checkpoint_every=$STEPS"} \
  --out "$RUN" --resume
LAST="$(basename "$(ls -d "$RUN"/eval/step_* | sort | tail -n 1)")"  # the validation after the last step

echo
echo "held-out proxy set ($HELDOUT: no article in common with the training set), base vs trained:"
memtrain report "$RUN/eval/step_000000" "$RUN/eval/$LAST" --labels base,trained --out "$RUN/heldout.md"
echo
echo "per step: the training reward (the curves shade each step's spread; runs of 10+ steps add a moving"
echo "average) and the held-out validation (plots/validation.png: 95% intervals):"
memtrain plot --table "$RUN"
echo "sample trajectories: $RUN/samples.jsonl   TensorBoard: tensorboard --logdir $RUN/tensorboard"
echo "demo finished in $(( $(date +%s) - start ))s with the $ENGINE engine"
