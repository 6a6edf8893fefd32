"""memtrain's task as a verl agent loop: one ``run()`` = one session (one of the ``rollout.n`` runs of a row).

``run()`` calls the very task the native trainer uses (``memtrain.rl.tasks``: the memory agent, chunking,
prompts, IMR, rewards) with ``group_size=1`` on an :class:`~memtrain.engines.base.Engine` that forwards every
generation request to verl's rollout servers (:class:`ServerEngine`). The task is synchronous, so it runs in a
worker thread while the requests are awaited on verl's event loop.

It returns one :class:`AgentLoopOutput` per model call: the IMR answers first, then every memory step and the
final answer step of the trajectory last (verl's v1 trainer treats a session's last output as its outcome and
copies its ``reward_score``, the E2E reward R_E, to the other outputs). Each output carries in
``extra_fields["memtrain"]`` its rollout id, advantage group and rollout reward, from which the
``memtrain_joint`` estimator (:mod:`.estimator`) computes exactly the native trainer's advantages: E2E groups
span the ``rollout.n`` sessions of a row, each IMR group is one session's G2 answers.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from omegaconf import DictConfig, OmegaConf
from verl.experimental.agent_loop.agent_loop import AgentLoopBase, AgentLoopMetrics, AgentLoopOutput, register

from memtrain.agent.seeding import derive_seed
from memtrain.backends.verl import AGENT_NAME, META_KEY, ROW_COLUMN
from memtrain.config import Config
from memtrain.engines.base import Completion, GenerationRequest, SamplingParams
from memtrain.engines.checks import validate_requests
from memtrain.rl.rollout import Rollout, Task
from memtrain.rl.tasks.registry import make_task

# The task is synchronous; each running session holds one thread while its requests are awaited.
_EXECUTOR = ThreadPoolExecutor(max_workers=256, thread_name_prefix="memtrain-agent")
# verl builds an agent loop per trajectory; the task (e.g. a search task's retriever) is built once per worker
_TASKS: dict[tuple[str, int], Task] = {}


def task_for(config: Config, tokenizer: Any) -> Task:
    """The task of ``config`` for ``tokenizer``, built once per process."""
    key = (config.model_dump_json(), id(tokenizer))
    if key not in _TASKS:
        _TASKS[key] = make_task(config, tokenizer)
    return _TASKS[key]


def completion_from_tokens(tokenizer: Any, token_ids: list[int], log_probs: list[float] | None,
                           max_tokens: int) -> Completion:
    """An engine :class:`Completion` from a server's token output (memtrain's engine conventions).

    ``text`` is decoded without special tokens; ``finish_reason`` is 'length' when the cap was used up without
    a closing special token (verl reports 'completed' for both cases).
    """
    if log_probs is None or len(log_probs) != len(token_ids):
        got = 0 if log_probs is None else len(log_probs)
        raise RuntimeError(f"the rollout server returned {got} log-probs for {len(token_ids)} tokens; "
                           "memtrain needs one per token (rollout.calculate_log_probs=true)")
    ended = bool(token_ids) and token_ids[-1] in set(tokenizer.all_special_ids)
    finish = "length" if len(token_ids) >= max_tokens and not ended else "stop"
    text = tokenizer.decode(token_ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    return Completion(list(token_ids), text, [float(x) for x in log_probs], finish)


class ServerEngine:
    """A memtrain :class:`~memtrain.engines.base.Engine` on verl's async LLM server manager.

    ``generate`` is called from a worker thread; each completion is one ``server_manager.generate`` call
    scheduled on ``loop`` (verl's event loop), all of a batch concurrently. ``base_params`` are verl's
    sampling parameters (top_k, repetition_penalty, ...); temperature, top_p and max_tokens come per request.
    """

    def __init__(self, server_manager: Any, loop: asyncio.AbstractEventLoop, tokenizer: Any,
                 base_params: dict[str, Any], request_id: str, unique_ids: bool = False) -> None:
        self.server_manager = server_manager
        self.loop = loop
        self.tokenizer = tokenizer
        per_request = ("temperature", "top_p", "logprobs")
        self.base_params = {k: v for k, v in base_params.items() if k not in per_request}
        # one id per session, so verl routes a session's turns to the same server (prefix cache); under
        # rollout.full_determinism verl hands the id to vLLM, where concurrent requests need distinct ids
        self.request_id = request_id
        self.unique_ids = unique_ids
        self.calls = 0
        self.seconds = 0.0
        self.weight_steps: dict[str, int] = {}  # min/max_global_steps: the policy versions that generated

    def generate(self, requests: list[GenerationRequest]) -> list[list[Completion]]:
        validate_requests(requests)
        start = time.perf_counter()
        future = asyncio.run_coroutine_threadsafe(self._generate(requests), self.loop)
        out = future.result()
        self.seconds += time.perf_counter() - start
        return out

    async def _generate(self, requests: list[GenerationRequest]) -> list[list[Completion]]:
        calls = [self._one(r) for r in requests for _ in range(r.params.n)]
        flat = await asyncio.gather(*calls)
        out, i = [], 0
        for r in requests:
            out.append(list(flat[i: i + r.params.n]))
            i += r.params.n
        return out

    async def _one(self, request: GenerationRequest) -> Completion:
        p = request.params
        params = {**self.base_params, "temperature": p.temperature, "top_p": p.top_p,
                  "max_tokens": p.max_tokens, "logprobs": True}
        self.calls += 1
        rid = f"{self.request_id}-{self.calls}" if self.unique_ids else self.request_id
        output = await self.server_manager.generate(request_id=rid, prompt_ids=list(request.prompt_ids),
                                                    sampling_params=params)
        for key, pick in (("min_global_steps", min), ("max_global_steps", max)):
            value = output.extra_fields.get(key)
            if value is not None:
                self.weight_steps[key] = pick(self.weight_steps.get(key, value), int(value))
        return completion_from_tokens(self.tokenizer, list(output.token_ids), output.log_probs, p.max_tokens)


def rollout_meta(uid: str, session: int, index: int, rollout: Rollout) -> dict[str, Any]:
    """The advantage bookkeeping of one rollout: a step-unique rollout id, its group and reward.

    A primary group (E2E, search) spans the row's sessions; a secondary one (IMR: the G2 answers to one
    session's own IMR prompt) is scoped to its session (``memtrain.rl.rollout.GroupKind``).
    """
    group = f"{uid}/{rollout.group}" if rollout.primary else f"{uid}/{session}/{rollout.group}"
    return {"rollout": f"{uid}/{session}/{index}", "group": group, "reward": float(rollout.reward),
            "kind": rollout.kind.name}


def rollout_outputs(rollouts: list[Rollout], uid: str, session: int, seconds: float,
                    counters: dict[str, float] | None = None,
                    weight_steps: dict[str, int] | None = None) -> list[AgentLoopOutput]:
    """One output per turn of ``rollouts``; the primary rollout's final turn last, carrying R_E and,
    as verl's ``reward_extra_info``, the rollout's metrics and the task's ``counters``. ``weight_steps``
    (min/max_global_steps of the policy versions that generated the session) go to every output: verl's
    staleness bookkeeping reads them."""
    primary = [r for r in rollouts if r.primary]
    if len(primary) != 1:
        raise RuntimeError(f"a verl session expects exactly one rollout of a primary group from the task, "
                           f"got {len(primary)} (kinds: {[r.kind.name for r in rollouts]})")
    ordered = [r for r in rollouts if not r.primary] + primary
    outputs = []
    for index, rollout in enumerate(ordered):
        meta = rollout_meta(uid, session, index, rollout)
        for turn in rollout.turns:
            if not turn.completion_ids:
                raise RuntimeError(f"an empty {turn.kind} completion (step {turn.step}) for rollout group "
                                   f"{rollout.group!r}: the prompt left no room to generate; raise "
                                   "agent.instruction_tokens or lower agent.chunk_tokens")
            outputs.append(AgentLoopOutput(
                prompt_ids=list(turn.prompt_ids), response_ids=list(turn.completion_ids),
                response_mask=[1] * len(turn.completion_ids), response_logprobs=list(turn.logprobs),
                num_turns=2, metrics=AgentLoopMetrics(generate_sequences=seconds),
                extra_fields={META_KEY: dict(meta, kind=turn.kind), **(weight_steps or {})}))
    final, main = outputs[-1], primary[0]
    final.reward_score = float(main.reward)
    final.extra_fields["reward_extra_info"] = {"reward": float(main.reward),
                                               **{k: float(v) for k, v in main.metrics.items()},
                                               **{k: float(v) for k, v in (counters or {}).items()}}
    return outputs


@register(AGENT_NAME)
class MemtrainAgentLoop(AgentLoopBase):
    """Runs ``memtrain.rl.tasks`` (``train.task``) for one session against verl's rollout servers.

    ``memtrain_config``: the memtrain config as a dict (rendered into verl's ``agent_loop_config_path`` file
    by :mod:`memtrain.backends.verl.config`). Dataset rows carry the memtrain row as JSON in ``memtrain_row``.
    """

    def __init__(self, *args: Any, memtrain_config: dict[str, Any] | DictConfig | None = None,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if memtrain_config is None:
            raise ValueError(f"agent loop {AGENT_NAME!r} needs memtrain_config: register it through "
                             "actor_rollout_ref.rollout.agent.agent_loop_config_path as rendered by "
                             "`memtrain train --backend verl`")
        if isinstance(memtrain_config, DictConfig):  # as hydra.utils.instantiate passes it, resolved once
            memtrain_config = OmegaConf.to_container(memtrain_config, resolve=False)
        self.memtrain_config = Config.model_validate(memtrain_config)
        self.task = task_for(self.memtrain_config, self.tokenizer)

    async def run(self, sampling_params: dict[str, Any], **kwargs: Any) -> list[AgentLoopOutput]:
        if ROW_COLUMN not in kwargs:
            raise ValueError(f"dataset row without a {ROW_COLUMN!r} column (columns: {sorted(kwargs)}); "
                             "build the verl dataset with memtrain.backends.verl.data")
        row = json.loads(kwargs[ROW_COLUMN])
        uid, session = str(kwargs.get("uid", "")), int(kwargs.get("session_id", 0))
        seed = derive_seed(self.memtrain_config.train.seed, int(kwargs.get("global_steps", 0)),
                           int(kwargs.get("index", 0)), session)
        params = SamplingParams(temperature=float(sampling_params["temperature"]),
                                top_p=float(sampling_params["top_p"]),
                                max_tokens=self.memtrain_config.agent.memory_tokens)
        engine = ServerEngine(self.server_manager, asyncio.get_running_loop(), self.tokenizer,
                              sampling_params, request_id=f"{uid}-{session}",
                              unique_ids=bool(self.rollout_config.get("full_determinism", False)))
        rollouts, counters = await asyncio.get_running_loop().run_in_executor(
            _EXECUTOR, self.task.rollout, [row], engine, params, 1, random.Random(seed))
        return rollout_outputs(rollouts, uid, session, engine.seconds, counters, engine.weight_steps)
