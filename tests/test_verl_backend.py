"""The verl backend: rendering (no verl needed), and with verl installed (its own environment, see
docs/verl.md) the agent loop against a scripted fake rollout server, advantage parity with the native trainer
through verl's own advantage code, and the rendered config loaded and validated by verl's Hydra schema."""

from __future__ import annotations

import asyncio
import json
import random
import re
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import torch

from memtrain.agent.loop import MemoryAgent
from memtrain.backends.verl import AGENT_NAME, ESTIMATOR_NAME, META_KEY, ROW_COLUMN, TRAINER_MODE
from memtrain.backends.verl.config import (
    RunPaths,
    agent_loop_entries,
    compose_verl_config,
    render_verl_config,
)
from memtrain.backends.verl.data import verl_rows, write_verl_dataset
from memtrain.config import load_config
from memtrain.engines.base import SamplingParams
from memtrain.engines.scripted import ScriptedEngine
from memtrain.models import load_tokenizer
from memtrain.prompts import INITIAL_MEMORY, render
from memtrain.rl.rollout import score_groups, training_sequences
from memtrain.rl.tasks.proxy import ProxyTask
from train_helpers import scripted_responder, scripted_rows, write_proxy_dataset

AGENT = ["agent.chunk_tokens=12", "agent.max_chunks=4", "agent.memory_tokens=16", "agent.answer_tokens=12",
         "rl.group_size=2", "rl.imr_group_size=2", "rl.imr_lambda=0.5"]


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path):
    return load_tokenizer(str(tiny_model_dir))


@pytest.fixture(scope="module")
def verl() -> Any:
    return pytest.importorskip("verl", reason="verl is not installed (pip install 'memtrain[verl]', own env)")


# ---------------------------------------------------------------------------------------------------------
# Rendering: pure memtrain, runs everywhere
# ---------------------------------------------------------------------------------------------------------

def test_rendered_verl_config_maps_every_setting(tmp_path: Path) -> None:
    config = load_config(None, ["train.batch_size=4", "rl.group_size=8", "rl.imr_group_size=8",
                                "rl.kl_coef=0.002",
                                "rl.loss_agg=token_mean", "rl.clip_high=0.28", "optim.lr=2e-6",
                                "optim.warmup_steps=5", "train.steps=30", "train.checkpoint_every=10",
                                "verl.gpus_per_node=8", "verl.nnodes=2", "verl.tensor_parallel=2",
                                "model.lora.rank=8"])
    paths = RunPaths(tmp_path / "run")
    cfg = render_verl_config(config, paths, "/models/qwen", num_rows=10)
    actor, rollout = cfg["actor_rollout_ref"]["actor"], cfg["actor_rollout_ref"]["rollout"]
    assert cfg["defaults"] == ["ppo_trainer", "_self_"]
    assert cfg["algorithm"]["adv_estimator"] == ESTIMATOR_NAME
    assert cfg["trainer"]["v1"]["trainer_mode"] == TRAINER_MODE
    assert cfg["algorithm"]["norm_adv_by_std_in_grpo"] is False  # Dr. GRPO
    # the DAPO filter is memtrain_sync's (per E2E and per IMR group); verl's whole-row filter only refills
    assert cfg["memtrain"] == {"dynamic_filter": True} and not cfg["algorithm"]["filter_groups"]["enable"]
    refill = render_verl_config(load_config(None, ["train.batch_size=4", "rl.fill_filtered_batches=true"]),
                                paths, "m", num_rows=10)
    assert refill["algorithm"]["filter_groups"] == {"enable": True, "metric": "reward"}
    off = render_verl_config(load_config(None, ["train.batch_size=4", "rl.dynamic_filter=false",
                                                "rl.fill_filtered_batches=true"]), paths, "m", num_rows=10)
    assert off["memtrain"] == {"dynamic_filter": False} and not off["algorithm"]["filter_groups"]["enable"]
    # settings the verl backend cannot express fail before anything starts, naming the key
    for bad, msg in ((["rl.loss_agg=session_mean"], r"rl.loss_agg=session_mean: the verl backend offers"),
                     (["agent.max_chunks=null"], r"agent.max_chunks is null"),
                     (["rl.top_p=0.9"], r"rl.top_p=0.9: training needs rl.top_p=1.0"),
                     (["train.eval_data=held"], r"train.eval_data='held': validation during training")):
        with pytest.raises(ValueError, match=msg):
            render_verl_config(load_config(None, ["train.batch_size=4", *bad]), paths, "m", num_rows=10)
    assert rollout["n"] == 8 and rollout["tensor_model_parallel_size"] == 2 and rollout["calculate_log_probs"]
    assert rollout["agent"]["default_agent_loop"] == AGENT_NAME
    assert rollout["agent"]["agent_loop_config_path"] == str(paths.agent_loop_file)
    # paper budgets: 1024 instruction + 5120 chunk + 1024 memory prompt, 1024 response
    lengths = (rollout["prompt_length"], rollout["response_length"], rollout["max_model_len"])
    assert lengths == (7168, 1024, 8192)
    assert (actor["kl_loss_coef"], actor["use_kl_loss"], actor["kl_loss_type"]) == (0.002, True, "low_var_kl")
    assert (actor["clip_ratio_low"], actor["clip_ratio_high"]) == (0.2, 0.28)
    assert actor["loss_agg_mode"] == "token-mean"
    # one optimizer step per batch: the mini-batch holds all (8 chunks + final + 8 IMR) outputs of 4 rows
    assert ProxyTask.session_shape(config).calls == 17
    assert actor["ppo_mini_batch_size"] == 4 * 17 and actor["ppo_epochs"] == 1
    assert actor["optim"]["lr"] == 2e-6 and actor["optim"]["lr_warmup_steps"] == 5
    assert cfg["actor_rollout_ref"]["model"]["lora_rank"] == 8
    trainer = cfg["trainer"]
    assert (trainer["nnodes"], trainer["n_gpus_per_node"], trainer["total_training_steps"]) == (2, 8, 30)
    assert trainer["total_epochs"] == 15  # 10 rows / batch 4 = 2 steps per epoch (verl drops the last batch)
    assert trainer["save_freq"] == 10 and trainer["default_local_dir"] == str(paths.checkpoints)
    env = cfg["ray_kwargs"]["ray_init"]["runtime_env"]["env_vars"]
    assert env["VERL_USE_EXTERNAL_MODULES"] == "memtrain.backends.verl.plugin"
    # E2E-only / long-QA: no IMR outputs
    qa = render_verl_config(load_config(None, ["train.task=longqa", "train.batch_size=4"]), paths, "m",
                            num_rows=10)
    assert qa["actor_rollout_ref"]["actor"]["ppo_mini_batch_size"] == 4 * 9
    assert (qa["data"]["max_prompt_length"], qa["data"]["max_response_length"]) == (7168, 1024)
    # search QA: one output per turn, prompts and replies sized by search.*
    search = load_config(None, ["train.task=searchqa", "train.batch_size=4", "search.max_turns=3",
                                "search.results_tokens=500", "search.response_tokens=2000"])
    sq = render_verl_config(search, paths, "m", num_rows=10)
    assert sq["actor_rollout_ref"]["actor"]["ppo_mini_batch_size"] == 4 * 3
    assert (sq["data"]["max_prompt_length"], sq["data"]["max_response_length"]) == (1024 + 500 + 1024, 2000)


CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "verl"


@pytest.mark.parametrize(("name", "model"), [("memtrain_qwen2.5_7b.yaml", "Qwen/Qwen2.5-7B-Instruct"),
                                             ("memtrain_qwen3_4b.yaml", "Qwen/Qwen3-4B-Instruct-2507")])
def test_shipped_verl_configs_render_the_paper_setup(tmp_path: Path, name: str, model: str) -> None:
    config = load_config(CONFIGS / name)
    assert config.model.name == model
    cfg = render_verl_config(config, RunPaths(tmp_path), model, num_rows=30000)
    actor, rollout = cfg["actor_rollout_ref"]["actor"], cfg["actor_rollout_ref"]["rollout"]
    assert (cfg["data"]["train_batch_size"], rollout["n"]) == (32, 8)
    assert cfg["trainer"]["total_training_steps"] == 300
    assert (actor["optim"]["lr"], actor["optim"]["lr_warmup_steps"]) == (1e-6, 20)
    assert actor["kl_loss_coef"] == 1e-3
    assert actor["loss_agg_mode"] == "seq-mean-token-mean" and cfg["algorithm"]["filter_groups"]["enable"]
    assert rollout["name"] == "vllm" and cfg["trainer"]["n_gpus_per_node"] == 8


def test_render_rejects_impossible_shapes(tmp_path: Path) -> None:
    paths = RunPaths(tmp_path)
    with pytest.raises(ValueError, match=r"fewer than train\.batch_size=32"):
        render_verl_config(load_config(None, []), paths, "m", num_rows=10)
    with pytest.raises(ValueError, match="must be divisible by the 16 GPUs"):
        render_verl_config(load_config(None, ["train.batch_size=3", "verl.nnodes=2"]), paths, "m",
                           num_rows=10)
    with pytest.raises(ValueError, match=r"verl\.max_tokens_per_gpu=4096 is below one whole sequence"):
        render_verl_config(load_config(None, ["verl.max_tokens_per_gpu=4096"]), paths, "m", num_rows=100)


def test_verl_dataset_rows_carry_the_memtrain_row(tmp_path: Path) -> None:
    rows = scripted_rows()
    out = verl_rows(rows, "proxy")
    assert [r["extra_info"] for r in out] == [{"index": 0, "id": "A"}, {"index": 1, "id": "B"}]
    assert out[0]["agent_name"] == AGENT_NAME and out[0]["data_source"] == "memtrain/proxy"
    assert out[0]["prompt"] == [{"role": "user", "content": rows[0]["question"]}]
    assert json.loads(out[0][ROW_COLUMN]) == rows[0]
    path = write_verl_dataset(rows, "proxy", tmp_path / "v" / "train.parquet")
    table = pq.read_table(path).to_pylist()
    assert [json.loads(r[ROW_COLUMN]) for r in table] == rows
    assert not list(path.parent.glob(".*tmp*"))
    with pytest.raises(ValueError, match=r"row 0 \(id 'A'\) is not JSON-serialisable"):
        verl_rows([{**rows[0], "bad": {1, 2}}], "proxy")


def test_templates_with_interpolation_syntax_are_escaped() -> None:
    config = load_config(None, ["agent.templates.final=Costs ${price}. {problem} {memory}"])
    entry = agent_loop_entries(config)[0]
    assert entry["memtrain_config"]["agent"]["templates"]["final"] == "Costs \\${price}. {problem} {memory}"


# ---------------------------------------------------------------------------------------------------------
# With verl: the agent loop, the estimator and the trainer hook, the config schema
# ---------------------------------------------------------------------------------------------------------

class FakeServerManager:
    """Stands in for verl's LLMServerClient: replies from ``scripted_responder`` as token ids + log-probs.

    To reproduce the native run exactly, a final-answer prompt is answered as completion ``session`` would be
    natively (the G1 identical final prompts form one request there), and the j-th identical IMR call of a
    session as completion j (the G2 answers of one IMR request).
    """

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.calls: list[tuple[str, list[int], dict[str, Any]]] = []
        self._seen: dict[tuple[str, str], int] = {}
        self._per_session: dict[str, int] = {}

    async def generate(self, request_id: str, *, prompt_ids: list[int], sampling_params: dict[str, Any],
                       **kwargs: Any) -> Any:
        from verl.workers.rollout.replica import TokenOutput

        self.calls.append((request_id, list(prompt_ids), dict(sampling_params)))
        text = self.tokenizer.decode(prompt_ids, skip_special_tokens=False)
        j = self._seen.get((request_id, text), 0)
        self._seen[(request_id, text)] = j + 1
        index = j if "[TARGET]" in text else int(request_id.rsplit("-", 1)[1])
        ids = list(self.tokenizer(scripted_responder(text, index), add_special_tokens=False)["input_ids"])
        cap = sampling_params["max_tokens"]
        ids = ids[:cap] if len(ids) >= cap else [*ids, self.tokenizer.eos_token_id]
        # the policy versions (LLMServerClient adds them to every output): alternating within each session,
        # counted before the await so that the interleaving of concurrent sessions cannot change them
        session = request_id.rsplit("-", 1)[0]
        self._per_session[session] = self._per_session.get(session, 0) + 1
        step = 3 + self._per_session[session] % 2
        await asyncio.sleep(0)
        steps = {"global_steps": step, "min_global_steps": step, "max_global_steps": step}
        return TokenOutput(token_ids=ids, log_probs=[-0.5] * len(ids), stop_reason="completed",
                           extra_fields=steps)


def _agent_loop(config: Any, tokenizer: Any, server: Any) -> Any:
    """Built the way verl's AgentLoopWorker builds it: hydra.instantiate of the rendered agent-loop entry."""
    import hydra
    from omegaconf import OmegaConf
    from verl.experimental.agent_loop.agent_loop import DictConfigWrap

    rollout = {"prompt_length": 1024, "response_length": 64}
    trainer_config = OmegaConf.create({"actor_rollout_ref": {"rollout": rollout}, "data": {}})
    return hydra.utils.instantiate(config=OmegaConf.create(agent_loop_entries(config)[0]),
                                   trainer_config=DictConfigWrap(trainer_config), server_manager=server,
                                   tokenizer=tokenizer, processor=None, dataset_cls=None,
                                   data_config=DictConfigWrap(OmegaConf.create({})))


SAMPLING = {"temperature": 1.0, "top_p": 1.0, "top_k": -1, "repetition_penalty": 1.0, "logprobs": True}


def _sessions(config: Any, tokenizer: Any, rows: list[dict], uids: list[str]) -> tuple[list[list[Any]], Any]:
    """verl's rollout.n sessions of every row, as AgentLoopWorkerTQ runs them (one run() per session)."""
    server = FakeServerManager(tokenizer)

    async def all_sessions() -> list[list[Any]]:
        tasks = [_agent_loop(config, tokenizer, server).run(
            dict(SAMPLING), **{ROW_COLUMN: json.dumps(row), "uid": uid, "session_id": s, "index": i,
                               "global_steps": 1, "raw_prompt": []})
                 for i, (row, uid) in enumerate(zip(rows, uids, strict=True))
                 for s in range(config.rl.group_size)]
        return list(await asyncio.gather(*tasks))

    return asyncio.run(all_sessions()), server


def test_agent_loop_run_returns_one_output_per_model_call(verl: Any, tiny_model_dir: Path,
                                                          tokenizer: Any) -> None:
    config = load_config(None, [f"model.name={tiny_model_dir}", *AGENT])
    # the memtrain config reaches the loop intact through the rendered entry and hydra.instantiate
    odd = load_config(None, [f"model.name={tiny_model_dir}", *AGENT,
                             "agent.templates.final=Costs ${price}. {problem} {memory}"])
    assert _agent_loop(odd, tokenizer, None).memtrain_config == odd
    # verl builds a loop per trajectory; the task is built once per worker process
    assert _agent_loop(config, tokenizer, None).task is _agent_loop(config, tokenizer, None).task
    sessions, server = _sessions(config, tokenizer, scripted_rows()[:1], ["u1"])
    for s, outputs in enumerate(sessions):
        metas = [o.extra_fields[META_KEY] for o in outputs]
        # IMR answers first (their own group, scoped to the session), then 4 memory steps, final step last
        assert [m["kind"] for m in metas] == ["imr", "imr", "memory", "memory", "memory", "memory", "final"]
        assert [m["group"] for m in metas] == [f"u1/{s}/A/0/imr"] * 2 + ["u1/A/e2e"] * 5
        assert len({m["rollout"] for m in metas}) == 3  # two IMR rollouts + the trajectory
        # only the last output carries the E2E reward for verl (which copies it to the session's outputs)
        assert [o.reward_score for o in outputs[:-1]] == [None] * 6
        assert outputs[-1].reward_score == pytest.approx([1.25, 0.25][s])
        info = outputs[-1].extra_fields["reward_extra_info"]
        assert info["e2e_match"] == [1.0, 0.0][s] and info["imr_bonus"] == pytest.approx(0.25)
        assert info["imr_prompts"] == 1.0
        for o in outputs:
            assert (o.extra_fields["min_global_steps"], o.extra_fields["max_global_steps"]) == (3, 4)
            n = len(o.response_ids)
            assert o.response_mask == [1] * n and o.response_logprobs == [-0.5] * n
    # every prompt is memtrain's own rendering: the first memory step of the document
    first = sessions[0][2]
    chunk = MemoryAgent(server, tokenizer, config.agent).chunk(scripted_rows()[0]).chunks[0]
    _, ids = render(tokenizer, "memory", problem=scripted_rows()[0]["question"], memory=INITIAL_MEMORY,
                    chunk=chunk)
    assert first.prompt_ids == ids
    # per-kind token caps and verl's other sampling parameters reach the server; one request id per session
    caps = {tuple(p): sp["max_tokens"] for _, p, sp in server.calls}
    assert caps[tuple(first.prompt_ids)] == 16 and caps[tuple(sessions[0][-1].prompt_ids)] == 12
    assert {sp["top_k"] for _, _, sp in server.calls} == {-1}
    assert {rid for rid, _, _ in server.calls} == {"u1-0", "u1-1"}



class FakeTransferQueue:
    """The TransferQueue calls of verl's advantage step, on a dict: tensors come back as jagged nested
    tensors (as TQ stores per-token fields), other values as a NonTensorStack; fields never written are
    absent. A put returns the written samples' metadata, as TQ does."""

    def __init__(self) -> None:
        self.rows: dict[str, dict[str, Any]] = {}
        self.tags: dict[str, dict[str, Any]] = {}

    def kv_batch_get(self, keys: list[str], partition_id: str, select_fields: list[str]) -> Any:
        from tensordict import NonTensorStack, TensorDict

        out: dict[str, Any] = {}
        for name in select_fields:
            values = [self.rows[k].get(name) for k in keys]
            if any(v is None for v in values):
                continue
            if isinstance(values[0], torch.Tensor):
                out[name] = torch.nested.as_nested_tensor(values, layout=torch.jagged)
            else:
                out[name] = NonTensorStack(*values)
        return TensorDict(out, batch_size=[len(keys)])

    def kv_batch_put(self, keys: list[str], partition_id: str, fields: Any) -> Any:
        from transfer_queue import KVBatchMeta

        for name in fields.keys():  # noqa: SIM118 - a TensorDict, whose iteration is not over its keys
            for key, value in zip(keys, fields[name].unbind(0), strict=True):
                self.rows[key][name] = value
        return KVBatchMeta(keys=list(keys), tags=[self.tags.get(k, {}) for k in keys],
                           partition_id=partition_id, fields=sorted({f for k in keys for f in self.rows[k]}))


def _transfer_queue_rows(sessions: list[list[Any]], uids: list[str],
                         n: int) -> tuple[FakeTransferQueue, list[str]]:
    """What AgentLoopWorkerTQ._agent_loop_postprocess stores: key {uid}_{session}_{index}, the last output's
    reward copied to the session's other outputs, output.as_dict() + the prompt's uid, and the loss mask (a
    copy of the response mask, from which verl's engine counts the tokens of ``token-mean``)."""
    tq = FakeTransferQueue()
    keys = []
    for j, outputs in enumerate(sessions):
        uid, session = uids[j // n], j % n
        for output in outputs[:-1]:
            output.reward_score = outputs[-1].reward_score
        for i, output in enumerate(outputs):
            key = f"{uid}_{session}_{i}"
            row = {**output.as_dict(), "uid": uid}
            tq.rows[key] = {**row, "loss_mask": row["response_mask"]}
            keys.append(key)
    return tq, keys


def parity_rows() -> list[dict]:
    """``scripted_rows()`` (A: E2E and IMR groups with signal; B: uniform E2E group, no IMR) plus the two
    mixed cases the DAPO filter must tell apart. C: gold Italy, so both final answers (France, Spain) are
    wrong and both trajectories get R_E = 0 + 0.5/2 * (1 + 0) - a uniform E2E group whose IMR groups (Paris
    right, Rome wrong) have signal. D: only entity Berlin, so both IMR answers (Paris, Rome) are wrong - IMR
    groups uniform - while the E2E group (France right, Spain wrong) has signal."""
    a, b = scripted_rows()
    text = a["context"].replace("Paris", "Berlin")
    spans = [{"start": m.start(), "end": m.end(), "label": "GPE"} for m in re.finditer("Berlin", text)]
    return [a, b, {**a, "id": "C", "answers": ["Italy"]},
            {**a, "id": "D", "context": text, "entity_spans": spans}]


class FakeActorWorkers:
    """Stands in for verl's actor worker group: records what ``update_actor`` is handed (the loss
    normalisers travel in ``extra_info``)."""

    def __init__(self) -> None:
        self.extra_info: dict[str, Any] = {}

    def update_actor(self, batch: Any) -> dict[str, Any]:
        self.extra_info = dict(batch.extra_info)
        return {"metrics": {"mfu": 0.0}}


@pytest.mark.parametrize(("std_norm", "dynamic_filter"), [(False, True), (True, True), (False, False)])
def test_verl_trains_exactly_what_the_native_trainer_trains(verl: Any, tmp_path: Path, tiny_model_dir: Path,
                                                           tokenizer: Any, monkeypatch: pytest.MonkeyPatch,
                                                           std_norm: bool, dynamic_filter: bool) -> None:
    """Same rollouts -> through verl's own _compute_advantage and _update_actor (with the rendered config's
    settings): every output's advantage equals the native trainer's; the outputs left in the loss (a
    non-empty response mask) are exactly the native kept training sequences, the DAPO filter dropping each
    E2E group and each IMR group on its own; and the loss normalisers verl's actor divides by (sequences for
    seq-mean, loss-mask tokens for token-mean) count exactly those. verl's padding rows get advantage 0."""
    from omegaconf import OmegaConf
    from transfer_queue import KVBatchMeta
    from verl.trainer.ppo.v1 import trainer_base

    from memtrain.backends.verl.estimator import MemtrainTrainer

    config = load_config(None, [f"model.name={tiny_model_dir}", *AGENT, "train.batch_size=4",
                                f"rl.adv_std_norm={std_norm}", f"rl.dynamic_filter={dynamic_filter}"])
    rows, uids = parity_rows(), ["uA", "uB", "uC", "uD"]
    # native: one task call for all rows, G1 = 2 trajectories each
    native, _ = ProxyTask(config, tokenizer).rollout(rows, ScriptedEngine(scripted_responder, tokenizer),
                                                     SamplingParams(temperature=1.0), 2, random.Random(0))
    scored = score_groups(native, std_norm, dynamic_filter)
    expected = training_sequences(scored)
    every = training_sequences(score_groups(native, std_norm, dynamic_filter=False))
    assert {round(s.advantage, 6) for s in expected} != {0.0}
    if dynamic_filter:  # the rows cover both mixed cases
        assert scored.groups == {"A/e2e": True, "A/0/imr": True, "A/1/imr": True, "B/e2e": False,
                                 "C/e2e": False, "C/0/imr": True, "C/1/imr": True,
                                 "D/e2e": True, "D/0/imr": False, "D/1/imr": False}
    # verl: one run() per session, outputs stored as TransferQueue rows, plus one padding row
    sessions, _ = _sessions(config, tokenizer, rows, uids)
    tq, keys = _transfer_queue_rows(sessions, uids, 2)
    # a padding row as verl's upsample_batch_to_divisible_size makes it: a real row's fields, one masked token
    empty = torch.zeros(1, dtype=torch.int64)
    tq.rows["pad"] = {**tq.rows[keys[0]], "response_mask": empty, "loss_mask": empty, "responses": empty,
                      "rm_scores": torch.zeros(1), "rollout_log_probs": torch.zeros(1)}
    tq.tags["pad"] = {"is_padding": True}
    batch = KVBatchMeta(keys=[*keys, "pad"], tags=[tq.tags.get(k, {}) for k in [*keys, "pad"]],
                        partition_id="train")
    monkeypatch.setattr(trainer_base, "tq", tq)
    rendered = render_verl_config(config, RunPaths(tmp_path), str(tiny_model_dir), num_rows=4)
    actor = rendered["actor_rollout_ref"]["actor"]
    trainer = MemtrainTrainer.__new__(MemtrainTrainer)
    trainer.config = OmegaConf.create({
        "algorithm": {**rendered["algorithm"], "gamma": 1.0, "lam": 1.0},
        "memtrain": rendered.get("memtrain", {}),
        "actor_rollout_ref": {"rollout": {"n": 2, "temperature": 1.0},
                              "actor": {"ppo_mini_batch_size": actor["ppo_mini_batch_size"], "ppo_epochs": 1,
                                        "calculate_entropy": False, "entropy_coeff": 0.0,
                                        "data_loader_seed": 1, "shuffle": False}}})
    trainer.actor_rollout_wg = workers = FakeActorWorkers()
    metrics: dict[str, float] = {}
    batch = trainer._compute_advantage(batch, metrics)
    trainer._update_actor(batch, {})

    got, trained = [], []
    for key in keys:
        row = tq.rows[key]
        adv = row["advantages"]
        assert len(adv) == len(row["responses"]) and bool((adv == adv[0]).all())  # broadcast over the tokens
        output = (row["extra_fields"][META_KEY]["kind"], row["responses"].tolist(), round(float(adv[0]), 5))
        got.append(output)
        assert torch.equal(row["loss_mask"], row["response_mask"])
        if int(row["response_mask"].sum()) > 0:
            assert bool(row["response_mask"].all())
            trained.append(output)
    # advantages: every output (kept or not) as the native trainer computes them
    assert sorted(got) == sorted((s.kind, s.completion_ids, round(s.advantage, 5)) for s in every)
    # the kept set: exactly the native trainer's training sequences
    assert sorted(trained) == sorted((s.kind, s.completion_ids, round(s.advantage, 5)) for s in expected)
    assert float(tq.rows["pad"]["advantages"].abs().sum()) == 0.0
    assert int(tq.rows["pad"]["response_mask"].sum()) == 0
    # the normalisers: seq-mean divides by the kept sequences (not verl's padded mini-batch); token-mean by
    # the loss-mask tokens of the whole batch
    assert workers.extra_info["global_batch_size"] == len(expected)
    assert sum(int(tq.rows[k]["loss_mask"].sum()) for k in [*keys, "pad"]) == sum(
        len(s.completion_ids) for s in expected)
    # A and D: E2E groups with signal; C: two IMR groups with signal; B and C: uniform E2E groups, D: two
    # uniform IMR groups
    assert metrics == {"memtrain/groups": 10.0, "memtrain/uniform_groups": 4.0, "memtrain/rollouts": 20.0,
                       "memtrain/filtered_groups": 4.0 if dynamic_filter else 0.0,
                       "memtrain/train_outputs": float(len(expected))}
    # so verl's own aggregation (agg_loss, as its actor calls it) of any per-token loss equals the native one
    # (memtrain.rl.core.aggregate over the kept sequences), e.g. of a loss that is each token's id
    from verl.trainer.ppo.core_algos import agg_loss

    from memtrain.rl.core import aggregate

    def padded(rows: list[list[int]], masks: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(r) for r in rows)
        pad = [[0] * (width - len(r)) for r in rows]
        return (torch.tensor([r + z for r, z in zip(rows, pad, strict=True)], dtype=torch.float64),
                torch.tensor([m + z for m, z in zip(masks, pad, strict=True)], dtype=torch.float64))

    all_keys = [*keys, "pad"]
    loss_v, mask_v = padded([tq.rows[k]["responses"].tolist() for k in all_keys],
                            [tq.rows[k]["response_mask"].tolist() for k in all_keys])
    loss_n, mask_n = padded([s.completion_ids for s in expected],
                            [[1] * len(s.completion_ids) for s in expected])
    tokens = sum(int(tq.rows[k]["loss_mask"].sum()) for k in all_keys)  # what verl's engine all-reduces
    seqs = workers.extra_info["global_batch_size"]
    assert float(agg_loss(loss_v, mask_v, "seq-mean-token-mean", global_batch_size=seqs)) == \
        pytest.approx(float(aggregate(loss_n, mask_n, "seq_mean_token_mean")))
    assert float(agg_loss(loss_v, mask_v, "token-mean", batch_num_tokens=tokens)) == \
        pytest.approx(float(aggregate(loss_n, mask_n, "token_mean")))
    # more than one mini-batch per step (an override of actor.ppo_mini_batch_size): no single count to give,
    # so seq-mean keeps verl's own denominator, the mini-batch size
    trainer._train_outputs = len(expected)
    trainer.config.actor_rollout_ref.actor.ppo_mini_batch_size = 2
    trainer._update_actor(batch, {})
    assert workers.extra_info["global_batch_size"] == 2 * 2
    # nothing kept: no actor update at all (natively: no optimizer step), not a zero-gradient one
    workers.extra_info = {}
    trainer._train_outputs = 0
    skipped: dict[str, float] = {}
    assert trainer._update_actor(batch, skipped) is batch
    assert workers.extra_info == {} and skipped == {"memtrain/skipped_empty": 1.0}


def test_memtrain_trainer_is_verls_sync_trainer(verl: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Selected as memtrain_sync, it presents itself to verl's constructor as mode 'sync' (which verl tests
    for by name to pick the synchronous replay buffer, refill and checkpoint behaviour)."""
    from omegaconf import OmegaConf
    from verl.trainer.ppo.v1 import trainer_base

    from memtrain.backends.verl.estimator import MemtrainTrainer

    seen = {}
    monkeypatch.setattr(trainer_base.PPOTrainer, "__init__",
                        lambda self, config: seen.update(mode=config.trainer.v1.trainer_mode))
    config = OmegaConf.create({"trainer": {"v1": {"trainer_mode": TRAINER_MODE}}})
    OmegaConf.set_struct(config, True)
    MemtrainTrainer(config)
    assert seen == {"mode": "sync"}


def test_estimator_needs_the_memtrain_trainer_and_memtrain_outputs(verl: Any) -> None:
    from verl.trainer.ppo.core_algos import get_adv_estimator_fn
    from verl.trainer.ppo.v1.trainer_base import get_trainer_cls

    from memtrain.backends.verl.estimator import (
        MemtrainTrainer,
        RowMeta,
        batch_rows,
        joint_advantages,
        kept_outputs,
        row_meta,
    )

    assert get_trainer_cls(TRAINER_MODE) is MemtrainTrainer
    fn = get_adv_estimator_fn(ESTIMATOR_NAME)
    rewards, mask = torch.zeros(3, 4), torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]])
    with pytest.raises(RuntimeError, match=r"trainer\.v1\.trainer_mode=memtrain_sync"):
        fn(token_level_rewards=rewards, response_mask=mask, config=None)
    metas = [RowMeta("r0", "g", 1.0, "final"), RowMeta("r0", "g", 1.0, "memory"),
             RowMeta("r1", "g", 0.0, "final")]
    with batch_rows(metas):
        adv, returns = fn(token_level_rewards=rewards, response_mask=mask,
                          config={"norm_adv_by_std_in_grpo": False})
    # a rollout counts once in its group however many outputs it has: mean(1, 0) = 0.5
    assert adv.tolist() == [[0.5, 0.5, 0, 0], [0.5, 0.5, 0.5, 0.5], [-0.5, 0, 0, 0]]
    assert torch.equal(adv, returns)
    with batch_rows(metas[:2]), pytest.raises(RuntimeError, match="2 output descriptions for a batch of 3"):
        fn(token_level_rewards=rewards, response_mask=mask)
    # the DAPO keep mask: each group on its own, padding never
    mixed = [RowMeta("e0", "g", 1.0, "final"), RowMeta("e1", "g", 1.0, "final"),
             RowMeta("i0", "g/0/imr", 1.0, "imr"), RowMeta("i1", "g/0/imr", 0.0, "imr"), None]
    assert kept_outputs(mixed, dynamic_filter=True) == [False, False, True, True, False]
    assert kept_outputs(mixed, dynamic_filter=False) == [True, True, True, True, False]
    with pytest.raises(ValueError, match="different group/reward"):
        joint_advantages([RowMeta("r0", "g", 1.0, "final"), RowMeta("r0", "g", 0.0, "memory")])
    with pytest.raises(ValueError, match="has no extra_fields\\['memtrain'\\]"):
        row_meta({"turn_scores": []}, "u_0_0")


def test_rendered_config_loads_in_verls_schema(verl: Any, tmp_path: Path, tiny_model_dir: Path) -> None:
    """The written run loads with Hydra exactly as verl.trainer.main_ppo does and passes verl's validation;
    verl's dataset class reads the written parquet and hands the memtrain row to the agent loop."""
    from omegaconf import OmegaConf
    from verl.utils.config import omega_conf_to_dataclass
    from verl.utils.dataset.rl_dataset import RLHFDataset

    from memtrain.backends.verl.launch import run

    data = write_proxy_dataset(tmp_path / "data")
    config = load_config(None, [f"model.name={tiny_model_dir}", f"data.path={data}", *AGENT,
                                "train.batch_size=4",
                                "train.steps=3", "verl.gpus_per_node=2", "verl.max_tokens_per_gpu=2048",
                                "verl.overrides=['trainer.logger=[console]']"])
    out = tmp_path / "run"
    extra = ["actor_rollout_ref.rollout.gpu_memory_utilization=0.4"]
    assert run(config, out, overrides=extra, dry_run=True) == 0
    paths = RunPaths(out.resolve())
    cfg = compose_verl_config(paths, [*config.verl.overrides, *extra])
    assert cfg.trainer.logger == ["console"] and cfg.actor_rollout_ref.rollout.gpu_memory_utilization == 0.4
    assert cfg.algorithm.adv_estimator == ESTIMATOR_NAME and cfg.trainer.use_v1
    assert cfg.memtrain.dynamic_filter and not cfg.algorithm.filter_groups.enable
    rollout = omega_conf_to_dataclass(cfg.actor_rollout_ref.rollout)
    assert rollout.n == 2 and rollout.agent.default_agent_loop == AGENT_NAME
    entries = OmegaConf.load(cfg.actor_rollout_ref.rollout.agent.agent_loop_config_path)
    assert entries[0].name == AGENT_NAME and entries[0].memtrain_config.agent.chunk_tokens == 12
    assert load_config(out / "config.yaml") == config
    # verl's own dataset class over the written file
    tok = load_tokenizer(str(tiny_model_dir))
    dataset = RLHFDataset(data_files=[str(paths.train_file)], tokenizer=tok, config=cfg.data)
    item = dataset[1]
    assert item["agent_name"] == AGENT_NAME and item["index"] == 1
    assert json.loads(item[ROW_COLUMN])["id"] == "doc1"
    # bad settings are verl's errors, named with the file
    with pytest.raises(ValueError, match=r"(?s)verl rejected the rendered config .*Invalid loss_agg_mode"):
        compose_verl_config(paths, ["actor_rollout_ref.actor.loss_agg_mode=bogus"])
    # the run directory is protected like the native trainer's; --resume with the same config is fine
    with pytest.raises(FileExistsError, match="already holds a training run"):
        run(config, out, dry_run=True)
    assert run(config, out, resume=True, dry_run=True) == 0
    changed = config.model_copy(update={"rl": config.rl.model_copy(update={"imr_lambda": 1.0})})
    with pytest.raises(ValueError, match=r"rl\.imr_lambda"):
        run(changed, out, resume=True, dry_run=True)
