"""One prepared GPU check (#26): what memtrain runs on a GPU, on a tiny model built where it runs (no
network, no embedded assets), in a few minutes. scripts/gpu_check.sh runs each part in the environment that
has its libraries and prints one table; ``--dry-run`` runs the same steps on the CPU (CI does).

Parts (``--only``, comma-separated):
  device  the accelerator, torch, and a bf16 matmul's TFLOP/s (the bound the other figures compare with)
  native  2 native training steps with the HF engine (bf16 compute over fp32 master weights): real
          rollouts, rewards that vary (the share of even token ids in the answer), real updates, a checkpoint
          that loads back with the trained weights
  fsdp2   the same 2 steps with train.parallel=fsdp2 as the one rank of a process group (NCCL on a GPU)
  vllm    the vLLM engine (sleep mode on a GPU): sample, update the policy, sync the weights (self-check),
          release the memory and wake for the next generation, sync again
  verl    the verl backend: one training step on a GPU; --dry-run writes and checks its config only

Results go to RESULTS/<part>.json; ``--summary RESULTS`` prints the table and exits 1 if a part failed.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "tests"))  # the test suite's tiny dataset and short prompt templates

PARTS: dict[str, Callable[[argparse.Namespace, Path], str]] = {}


class Skipped(Exception):
    """The part cannot run here (a library missing): reported, not a failure."""


def part(name: str) -> Callable[[Callable[[argparse.Namespace, Path], str]], Callable[..., str]]:
    def register(fn: Callable[[argparse.Namespace, Path], str]) -> Callable[..., str]:
        PARTS[name] = fn
        return fn
    return register


def _device(args: argparse.Namespace) -> str:
    import torch

    if args.dry_run:
        return "cpu"
    if not torch.cuda.is_available():
        raise RuntimeError("no CUDA device visible (torch.cuda.is_available() is False); --dry-run runs on "
                           "the CPU")
    return "cuda"


def _tiny(tmp: Path) -> tuple[Path, Path]:
    from memtrain.models import build_tiny_model
    from train_helpers import write_proxy_dataset

    return build_tiny_model(tmp / "tiny", hidden_size=128), write_proxy_dataset(tmp / "data")


def _two_steps(args: argparse.Namespace, tmp: Path, extra: list[str]) -> str:
    import torch
    from safetensors.torch import load_file

    from memtrain.io import read_jsonl
    from memtrain.rl.checkpoint import is_sharded
    from memtrain.rl.export import export_checkpoint
    from memtrain.rl.tasks.registry import TASKS
    from memtrain.rl.trainer import train
    from train_helpers import ParityTask, tiny_config

    device = _device(args)
    model_dir, data = _tiny(tmp)
    TASKS["longqa"] = ParityTask
    over = ["train.task=longqa", "rl.group_size=4", "optim.lr=1e-2", "optim.warmup_steps=0",
            "rl.dynamic_filter=false", "train.steps=2", f"model.device={device}",
            f"model.compute_dtype={'bfloat16' if device == 'cuda' else 'float32'}", *extra]
    start = time.perf_counter()
    train(tiny_config(model_dir, data, over), tmp / "run")
    seconds = time.perf_counter() - start
    rows = read_jsonl(tmp / "run" / "metrics.jsonl")
    if [r["step"] for r in rows] != [1, 2] or any(r.get("skipped_nonfinite") for r in rows):
        got = [(r["step"], r.get("skipped_nonfinite")) for r in rows]
        raise RuntimeError(f"expected 2 finite steps, got (step, skipped_nonfinite) {got}")
    if not any((r.get("kept_groups") or 0) > 0 for r in rows):
        raise RuntimeError("no step updated on any group")
    ckpt = tmp / "run" / "checkpoints" / "step_000002"
    if is_sharded(ckpt):  # FSDP2: every rank wrote its shards; export assembles the Hugging Face model
        ckpt = export_checkpoint(ckpt, tmp / "exported")
    trained = load_file(str(ckpt / "model.safetensors"))
    initial = load_file(str(model_dir / "model.safetensors"))
    moved = max(float((trained[k].float() - initial[k].float()).abs().max()) for k in initial)
    if not moved > 0 or not all(torch.isfinite(t).all() for t in trained.values()):
        raise RuntimeError(f"the checkpoint after 2 steps did not change finitely (max change {moved})")
    layout = "sharded checkpoint, exported" if ckpt.name == "exported" else "checkpoint"
    return (f"2 steps on {device} in {seconds:.1f}s ({layout}), "
            f"kept groups {[r.get('kept_groups') for r in rows]}, "
            f"grad norm {[round(r.get('grad_norm', 0.0), 3) for r in rows]}, max weight change {moved:.2g}")


@part("device")
def check_device(args: argparse.Namespace, tmp: Path) -> str:
    import torch

    device = _device(args)
    n = 8192 if device == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ a
    if device == "cuda":
        torch.cuda.synchronize()
    start, reps = time.perf_counter(), 10 if device == "cuda" else 3
    for _ in range(reps):
        a @ a
    if device == "cuda":
        torch.cuda.synchronize()
    tflops = 2 * n**3 * reps / (time.perf_counter() - start) / 1e12
    name = torch.cuda.get_device_name(0) if device == "cuda" else "CPU"
    return f"{name}, torch {torch.__version__}, bf16 matmul {n}^3: {tflops:.1f} TFLOP/s"


@part("native")
def check_native(args: argparse.Namespace, tmp: Path) -> str:
    return _two_steps(args, tmp, [])


@part("fsdp2")
def check_fsdp2(args: argparse.Namespace, tmp: Path) -> str:
    """FSDP2 as rank 0 of a group of 1, as torchrun --nproc-per-node 1 would start it."""
    import memtrain.rl.trainer as trainer
    from memtrain.rl.distributed import shutdown

    sharded = []
    shard_model = trainer.shard_model

    def recording(model, ctx, frozen=False):  # type: ignore[no-untyped-def]
        shard_model(model, ctx, frozen)
        sharded.append(type(next(model.parameters())).__name__)

    trainer.shard_model = recording

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1",
                      LOCAL_RANK="0")
    try:
        detail = _two_steps(args, tmp, ["train.parallel=fsdp2"])
    finally:
        shutdown(barrier=False)
        trainer.shard_model = shard_model
    if "DTensor" not in sharded:
        raise RuntimeError(f"the policy was not sharded (parameters {sharded or 'never sharded'})")
    return f"{detail}; parameters {sharded[0]} (FSDP2, 1 rank)"


@part("vllm")
def check_vllm(args: argparse.Namespace, tmp: Path) -> str:
    try:
        import vllm  # noqa: F401
    except ImportError as exc:
        raise Skipped(f"vllm is not importable here ({exc})") from exc
    import torch

    from memtrain.config import EngineConfig, RLConfig
    from memtrain.engines import make_engine
    from memtrain.engines.base import GenerationRequest, SamplingParams
    from memtrain.models import load_policy, load_tokenizer
    from memtrain.precision import set_compute_dtype
    from memtrain.rl.rollout import TrainSequence
    from memtrain.rl.update import policy_update

    device = _device(args)
    model_dir, _ = _tiny(tmp)
    tok = load_tokenizer(str(model_dir))
    model = load_policy(str(model_dir), dtype="float32", device=device)
    set_compute_dtype(model, torch.bfloat16 if device == "cuda" else torch.float32)
    cfg = EngineConfig(kind="vllm", kv_cache_gib=0.25 if device == "cpu" else None,
                       gpu_memory_utilization=0.3)
    engine = make_engine(cfg, str(model_dir), model=model, tokenizer=tok)
    text = "The memory agent reads a long document chunk by chunk."
    prompt = tok(text, add_special_tokens=False)["input_ids"]
    request = GenerationRequest(prompt, SamplingParams(n=8, temperature=1.0, max_tokens=16, seed=1))
    start = time.perf_counter()
    outs = engine.generate([request])[0]
    gen_s = time.perf_counter() - start
    rewards = [sum(t % 2 == 0 for t in o.token_ids) / len(o.token_ids) for o in outs]
    mean = sum(rewards) / len(rewards)
    seqs = [TrainSequence(prompt, o.token_ids, advantage=r - mean, old_logprobs=o.logprobs, group="g")
            for o, r in zip(outs, rewards, strict=True)]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    policy_update(model, optimizer, seqs, RLConfig(kl_coef=0.0))
    first = engine.sync_weights(model)
    engine.release_memory()  # GPU: weights offloaded, KV cache freed (sleep mode); CPU: no-op
    engine.generate([request])  # wakes
    policy_update(model, optimizer, seqs, RLConfig(kl_coef=0.0))
    second = engine.sync_weights(model)
    return (f"{device}, engine {engine.dtype}: 8 x 16 tokens in {gen_s:.2f}s; sync {first['sync_s']:.2f}s, "
            f"gap max {first['sync_logprob_max_diff']:.3g} then {second['sync_logprob_max_diff']:.3g} nats "
            f"(decode {second['sync_decode_max_diff']:.3g}) after sleep and wake")


@part("verl")
def check_verl(args: argparse.Namespace, tmp: Path) -> str:
    try:
        import verl  # noqa: F401
    except ImportError as exc:
        raise Skipped(f"verl is not importable here ({exc})") from exc
    from memtrain.cli.main import main as memtrain_main
    from train_helpers import config_yaml

    model_dir, data = _tiny(tmp)
    cfg = config_yaml(model_dir, data, tmp / "cfg.yaml")
    dry = args.dry_run or _device(args) != "cuda"
    argv = ["train", "--config", str(cfg), "--out", str(tmp / "verl"), "--backend", "verl", "train.steps=1",
            "train.checkpoint_every=1", "verl.gpus_per_node=1", *(["--dry-run"] if dry else [])]
    start = time.perf_counter()
    code = memtrain_main(argv)
    if code not in (0, None):
        raise RuntimeError(f"memtrain {' '.join(argv)} exited {code}")
    what = "config written and checked (--dry-run)" if dry else "1 training step"
    return f"{what} in {time.perf_counter() - start:.1f}s"


def run_parts(names: list[str], args: argparse.Namespace) -> None:
    args.results.mkdir(parents=True, exist_ok=True)
    for name in names:
        start = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix=f"gpu-check-{name}-") as tmp:
            try:
                result = {"status": "ok", "detail": PARTS[name](args, Path(tmp))}
            except Skipped as exc:
                result = {"status": "skipped", "detail": str(exc)}
            except Exception as exc:  # every part reports; the table shows which failed and why
                traceback.print_exc()
                result = {"status": "FAILED", "detail": f"{type(exc).__name__}: {exc}"[:400]}
        result.update(part=name, seconds=round(time.perf_counter() - start, 1), python=sys.executable)
        (args.results / f"{name}.json").write_text(json.dumps(result), encoding="utf-8")
        print(f"gpu_check {name}: {result['status']} ({result['seconds']}s) {result['detail']}", flush=True)


def summary(results: Path) -> int:
    rows = [json.loads(p.read_text(encoding="utf-8")) for p in sorted(results.glob("*.json"))]
    order = {name: i for i, name in enumerate(PARTS)}
    rows.sort(key=lambda r: order.get(r["part"], len(order)))
    print("\n| part | status | seconds | detail |\n|---|---|---:|---|")
    for r in rows:
        print(f"| {r['part']} | {r['status']} | {r['seconds']} | {r['detail']} |")
    missing = [name for name in PARTS if name not in {r["part"] for r in rows}]
    if missing:
        print(f"\nnot run: {', '.join(missing)}")
    return 1 if any(r["status"] == "FAILED" for r in rows) or missing else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="the same steps on the CPU")
    ap.add_argument("--only", default=",".join(PARTS), help=f"parts to run (default all: {','.join(PARTS)})")
    ap.add_argument("--results", type=Path, help="write each part's result here (default: a temp dir)")
    ap.add_argument("--summary", type=Path, metavar="RESULTS", help="print the table of RESULTS and exit")
    args = ap.parse_args()
    if args.summary is not None:
        return summary(args.summary)
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in PARTS]
    if unknown:
        ap.error(f"--only {','.join(unknown)}: unknown part(s); expected some of {','.join(PARTS)}")
    args.results = args.results or Path(tempfile.mkdtemp(prefix="gpu-check-"))
    os.environ.setdefault("MEMTRAIN_NO_PROGRESS", "1")
    run_parts(names, args)
    return summary(args.results) if args.only == ",".join(PARTS) else 0


if __name__ == "__main__":
    sys.exit(main())
