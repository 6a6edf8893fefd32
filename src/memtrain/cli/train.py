"""``memtrain train`` (GRPO training of the memory agent), ``memtrain export`` (any checkpoint -> a Hugging
Face model) and ``memtrain merge-lora`` (adapter -> model)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from memtrain.config import Config


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train the memory agent with GRPO (proxy task, long-doc QA, ...)",
        description="Train with GRPO. Settings come from --config, then dotted overrides such as "
        "rl.group_size=4 train.steps=10. A run directory holds the resolved config, metrics.jsonl, "
        "TensorBoard events, samples.jsonl and checkpoints; --resume continues it exactly.",
    )
    p.add_argument(
        "--config",
        type=Path,
        help="YAML config (e.g. configs/memtrain_demo_cpu.yaml); with --resume "
        "it defaults to RUN_DIR/config.yaml",
    )
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted config overrides")
    p.add_argument("--out", type=Path, help="run directory (default runs/<config file name>)")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out from its latest checkpoint (starts it when the directory is new)",
    )
    p.add_argument(
        "--backend",
        choices=("native", "verl"),
        default="native",
        help="native: this process (or torchrun) trains; verl: FSDP + vLLM/SGLang on Ray (docs/verl.md)",
    )
    p.add_argument(
        "--dry-run", action="store_true", help="--backend verl only: write and check the verl config"
    )
    p.set_defaults(func=_train)

    m = sub.add_parser("merge-lora", help="merge a LoRA checkpoint into its base model (full HF weights)")
    m.add_argument("checkpoint", type=Path, help="RUN/checkpoints/step_N of a run trained with model.lora")
    m.add_argument("--out", type=Path, required=True, help="directory for the merged model")
    m.add_argument(
        "--base", help="base model (default: the run's model.name, from the checkpoint's meta.json)"
    )
    m.set_defaults(func=_merge)

    e = sub.add_parser("export", help="a Hugging Face model directory from a run or checkpoint (any layout)")
    e.add_argument("source", type=Path, help="a run directory (its newest verified checkpoint) or checkpoint")
    e.add_argument("--out", type=Path, required=True, help="directory for the model")
    e.add_argument("--adapter", action="store_true", help="LoRA: keep the adapter instead of merging it")
    e.add_argument("--base", help="LoRA: base model to merge into (default: the run's model.name)")
    e.set_defaults(func=_export)


def check_before_training(config: Config, out: Path) -> None:
    """What can fail in one line before anything loads: the run directory is writable, ``train.task`` is
    registered, and its budgets fit the model (each task checks its own)."""
    from memtrain.io import check_writable
    from memtrain.rl.tasks.registry import task_class

    check_writable(out, "--out")
    task_class(config.train.task).check_budgets(config)


def _train(args: argparse.Namespace) -> int:
    from memtrain.config import load_config
    from memtrain.errors import UserError
    from memtrain.rl.distributed import shutdown
    from memtrain.rl.metrics import read_metrics, summary_table
    from memtrain.rl.trainer import CONFIG_FILE, NonFiniteError, train

    config_path = args.config
    if config_path is None:
        if not (args.resume and args.out):
            raise UserError("--config is required (it may be left out only with --resume --out RUN_DIR)")
        config_path = args.out / CONFIG_FILE
        if not config_path.is_file():
            raise FileNotFoundError(
                f"{config_path} not found: {args.out} holds no run to resume; pass --config"
            )
    config = load_config(config_path, args.overrides)
    out = args.out or Path("runs") / config_path.stem
    check_before_training(config, out)
    if args.backend == "verl":
        from memtrain.backends.verl.launch import run as run_verl

        try:
            return run_verl(config, out, resume=args.resume, dry_run=args.dry_run)
        except FileExistsError as exc:
            raise UserError(str(exc)) from exc
    try:
        train(config, out, resume=args.resume)
    except (FileExistsError, NonFiniteError) as exc:
        shutdown(barrier=False)
        raise UserError(str(exc)) from exc
    except BaseException:
        shutdown(barrier=False)
        raise
    shutdown()
    if os.environ.get("RANK", "0") != "0":
        return 0  # under torchrun rank 0 alone reports
    rows = read_metrics(out)
    print(summary_table(rows))
    print(
        f"run: {out}  (metrics.jsonl, samples.jsonl, tensorboard/, checkpoints/); curves: memtrain plot {out}"
    )
    return 0


def _merge(args: argparse.Namespace) -> int:
    from memtrain.rl.export import merge_lora

    out = merge_lora(args.checkpoint, args.out, base=args.base)
    print(f"merged model: {out}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from memtrain.rl.export import export_checkpoint

    out = export_checkpoint(args.source, args.out, adapter=args.adapter, base=args.base)
    print(f"model: {out}  (transformers: AutoModelForCausalLM.from_pretrained({str(out)!r}))")
    return 0
