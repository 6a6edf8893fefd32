"""The memory agent's token budgets against the model's context, and defaults that fit model and machine.

Why: a prompt longer than the model's positions does not fail in transformers - it runs for minutes and
returns garbage with exit 0 - so every entry point checks the budgets against the model's context before
anything is generated, and names the budget that does not fit. And the paper's GPU budgets (5120-token chunks,
1024-token memories) make the embedded 135M model on a CPU take half an hour per document, so a command run
without ``--config`` picks budgets by model and device (a pure function of the two) and says which it uses.
"""

from __future__ import annotations

from typing import Any

from memtrain.config import AgentConfig
from memtrain.errors import UserError

BUDGET_FIELDS = ("chunk_tokens", "memory_tokens", "answer_tokens")
# docs/method.md section 1: 1024 instruction/problem + 5120 chunk + 1024 memory + 1024 response = 8192.
PAPER_BUDGETS = {"chunk_tokens": 5120, "memory_tokens": 1024, "answer_tokens": 1024}
# configs/longqa_smollm2_cpu.yaml: a 7k-token document in minutes, not half an hour, on a laptop CPU.
SMALL_CPU_BUDGETS = {"chunk_tokens": 1024, "memory_tokens": 128, "answer_tokens": 64}
SMALL_MODELS = ("smollm2",)  # the embedded CPU model, by short name, HF name or asset directory


def context_need(agent: AgentConfig, imr: bool = False) -> tuple[int, str]:
    """The most tokens one turn can hold (prompt + response) and that sum spelled out by budget name.

    A memory turn holds instruction/problem, the previous memory, a chunk and the new memory it writes; the
    final turn holds instruction/problem, the memory and the answer; with ``imr`` (proxy training and
    evaluation) an IMR turn holds instruction/problem, a memory, a chunk and the answer.
    """
    a = agent
    head = f"agent.instruction_tokens {a.instruction_tokens}"
    turns = [(a.instruction_tokens + a.chunk_tokens + 2 * a.memory_tokens,
              f"{head} + agent.chunk_tokens {a.chunk_tokens} + agent.memory_tokens {a.memory_tokens} (memory "
              f"read) + agent.memory_tokens {a.memory_tokens} (memory written)"),
             (a.instruction_tokens + a.memory_tokens + a.answer_tokens,
              f"{head} + agent.memory_tokens {a.memory_tokens} + agent.answer_tokens {a.answer_tokens} "
              "(final turn)")]
    if imr:
        turns.append((a.instruction_tokens + a.chunk_tokens + a.memory_tokens + a.answer_tokens,
                      f"{head} + agent.chunk_tokens {a.chunk_tokens} + agent.memory_tokens {a.memory_tokens} "
                      f"+ agent.answer_tokens {a.answer_tokens} (IMR turn)"))
    return max(turns, key=lambda t: t[0])


def check_context_budget(agent: AgentConfig, context: int, model: str = "the model",
                         imr: bool = False) -> None:
    """Fail in one line, before any generation, when a turn's budgets exceed the model's positions."""
    need, terms = context_need(agent, imr)
    if need <= context:
        return
    over = need - context
    if need == agent.instruction_tokens + agent.chunk_tokens + 2 * agent.memory_tokens \
            and agent.chunk_tokens > over:
        fix = f"lower agent.chunk_tokens to {agent.chunk_tokens - over} or less"
    else:
        fix = "lower these budgets"
    raise UserError(f"{terms} = {need} tokens > {model}'s {context} positions; {fix}, or use a model with a "
                    "longer context")


def default_budgets(model_name: str, device: str) -> tuple[dict[str, int], str]:
    """Budgets for a run without a config: small ones for the embedded CPU model on a CPU, else the paper's.

    A pure function of the model name and the device (``cpu``, ``cuda``, or ``server`` for a remote engine).
    """
    name = model_name.lower()
    if device == "cpu" and any(m in name for m in SMALL_MODELS):
        return dict(SMALL_CPU_BUDGETS), f"{model_name} on cpu: small budgets for the embedded CPU model"
    return dict(PAPER_BUDGETS), f"the paper's budgets for {model_name} on {device}"


def run_device(cfg: Any) -> str:
    """Where the policy generates: ``server`` for a remote engine (``openai``), else ``model.device``
    resolved (the in-process engines, hf and vllm, run where the model does)."""
    if cfg.engine.kind == "openai":
        return "server"
    if cfg.model.device != "auto":
        return str(cfg.model.device)
    from memtrain.models import default_device

    return default_device()


def training_run_budgets(model: str) -> tuple[dict[str, int], str] | None:
    """The budgets a checkpoint was trained with (``RUN/checkpoints/step_N`` -> ``RUN/config.yaml``), so
    that evaluating a trained model next to its base model reads the documents the same way; None when
    ``model`` is not a memtrain checkpoint directory."""
    from pathlib import Path

    from memtrain.config import ConfigError, load_config

    path = Path(model).expanduser()
    run_config = path.resolve().parent.parent / "config.yaml"
    if not (path / "meta.json").is_file() or not run_config.is_file():
        return None
    try:
        trained = load_config(run_config).agent
    except ConfigError:
        return None
    return ({f: getattr(trained, f) for f in BUDGET_FIELDS},
            f"the budgets {model} was trained with ({run_config})")


def apply_default_budgets(cfg: Any, config_path: Any = None, device: str | None = None) -> str:
    """Fill the budgets the user did not set (no ``--config``; flags and overrides always win) and return
    the "budgets in force" line every agent command prints: a checkpoint's training budgets, else the
    defaults for the model and device."""
    agent: AgentConfig = cfg.agent
    if config_path is not None:
        why = f"from {config_path}"
    else:
        budgets, why = (training_run_budgets(cfg.model.name)
                        or default_budgets(cfg.model.name, device or run_device(cfg)))
        explicit = [f for f in BUDGET_FIELDS if f in agent.model_fields_set]
        for field, value in budgets.items():
            if field not in explicit:
                setattr(agent, field, value)
        if explicit:
            why += "; set explicitly: " + ", ".join(explicit)
    return (f"budgets in force: chunk {agent.chunk_tokens}, memory {agent.memory_tokens}, answer "
            f"{agent.answer_tokens} ({why})")
