"""A task defined here, and nowhere else, trains through the real trainer: registration is all it takes."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from safetensors.torch import load_file

from memtrain.engines.base import Engine, SamplingParams
from memtrain.errors import UserError
from memtrain.io import read_jsonl
from memtrain.rl.rollout import GroupKind, Rollout
from memtrain.rl.tasks.memory import MemoryAgentTask, agent_counters, trajectory_metrics
from memtrain.rl.tasks.registry import TASKS, register_task
from memtrain.rl.trainer import train
from train_helpers import tiny_config, write_proxy_dataset

CONTAINS = GroupKind("contains", primary=True)  # a kind of its own: its metrics are contains_*


@register_task("contains_token")
class ContainsTokenTask(MemoryAgentTask):
    """The memory agent, rewarded by whether its final answer contains a token whose id is a multiple of 3
    (a reward the samples of a random-weight model differ in, so the update has a gradient)."""

    required_fields = ("id", "context", "question", "answers")

    def rollout(self, samples: list[dict], engine: Engine, params: SamplingParams, group_size: int,
                rng: random.Random) -> tuple[list[Rollout], dict[str, float]]:
        agent = self.agent(engine, samples)
        out = []
        for traj in agent.run(samples, params, n=group_size):
            reward = float(any(t % 3 == 0 for t in traj.final_turn.completion_ids))
            out.append(Rollout(CONTAINS.group_id(traj.sample_id), reward, list(traj.turns), CONTAINS,
                               metrics=trajectory_metrics(traj, self.reward_metric),
                               record={"sample_id": traj.sample_id, "answer": traj.answer, "reward": reward}))
        return out, agent_counters(agent)


def _two_steps(model_dir: Path, tmp_path: Path, overrides: list[str]) -> tuple[Path, list[dict]]:
    """2 training steps of the tiny model with groups of 4 (checkpoint at step 2); the run and its rows."""
    run = tmp_path / "run"
    over = ["rl.group_size=4", "train.tensorboard=false", "train.checkpoint_every=2", *overrides]
    train(tiny_config(model_dir, write_proxy_dataset(tmp_path / "data"), over), run)
    return run, read_jsonl(run / "metrics.jsonl")


def test_a_task_registered_in_a_test_file_trains(tiny_model_dir: Path, tmp_path: Path) -> None:
    assert TASKS["contains_token"] is ContainsTokenTask and ContainsTokenTask.name == "contains_token"
    run, rows = _two_steps(tiny_model_dir, tmp_path, ["train.task=contains_token", "agent.answer_tokens=2"])
    assert [r["step"] for r in rows] == [1, 2]
    assert all(r["contains_reward"] is not None and r["e2e_reward"] is None for r in rows)
    assert any(r["filtered_groups"] < r["groups"] and r["num_seqs"] > 0 for r in rows)  # a real update
    samples = read_jsonl(run / "samples.jsonl")
    assert samples and {s["kind"] for s in samples} == {"contains"}
    initial = load_file(str(tiny_model_dir / "model.safetensors"))
    trained = load_file(str(run / "checkpoints" / "step_000002" / "model.safetensors"))
    assert max(float((trained[k] - initial[k]).abs().max()) for k in initial) > 0


def test_a_reward_registered_in_its_own_file_trains(tiny_model_dir: Path, tmp_path: Path) -> None:
    """rl.reward_metric names a reward registered in tests/reward_plugin.py; the proxy task pays it for the
    final answers and the IMR answers, and the run updates on it."""
    from memtrain.rl.rewards import REWARDS
    from reward_plugin import even_letters

    assert REWARDS["even_letters"] is even_letters
    run, rows = _two_steps(tiny_model_dir, tmp_path, ["rl.reward_metric=even_letters", "rl.imr_lambda=0.5"])
    assert [r["step"] for r in rows] == [1, 2] and all(r["reward_metric"] == "even_letters" for r in rows)
    assert any(r["kept_groups"] > 0 and r["num_seqs"] > 0 for r in rows)  # a real update on it
    samples = read_jsonl(run / "samples.jsonl")
    e2e = [s for s in samples if s["kind"] == "e2e"]
    assert e2e
    for s in e2e:  # R_E = the answer's reward + lambda x the mean reward of its IMR answers
        imr = s["imr"]["matches"] if s.get("imr") else []
        assert imr == [even_letters(a, []) for a in (s["imr"]["answers"] if imr else [])]
        bonus = 0.5 * sum(imr) / len(imr) if imr else 0.0
        assert s["reward"] == pytest.approx(even_letters(s["answer"], s["gold"]) + bonus, abs=1e-6)  # (fp32)
    initial = load_file(str(tiny_model_dir / "model.safetensors"))
    trained = load_file(str(run / "checkpoints" / "step_000002" / "model.safetensors"))
    assert max(float((trained[k] - initial[k]).abs().max()) for k in initial) > 0


def test_a_task_with_its_own_settings_and_prompt_trains(tiny_model_dir: Path, tmp_path: Path) -> None:
    """tests/task_plugin.py: a task with a ``task:`` section and a prompt kind of its own, no edit elsewhere;
    its settings reach the prompt (through an agent.templates override of the new kind) and the update."""
    import task_plugin

    assert TASKS["say_word"] is task_plugin.SayWordTask
    cfg = tiny_config(tiny_model_dir, write_proxy_dataset(tmp_path / "data"), [
        "rl.group_size=4", "train.tensorboard=false", "train.checkpoint_every=2", "train.task=say_word",
        "task.word=beta", "task.modulus=2", "agent.answer_tokens=3"])
    cfg.agent.templates = {**cfg.agent.templates, "say_word": "Please say {word}."}  # validated on assignment
    train(cfg, tmp_path / "run")
    rows = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2] and any(r["num_seqs"] > 0 for r in rows)
    samples = read_jsonl(tmp_path / "run" / "samples.jsonl")
    assert samples and all(s["prompt"].count("Please say beta.") == 1 for s in samples)
    assert len({s["reward"] for s in samples}) > 1  # thirds of 3 tokens: the groups have a gradient


@pytest.mark.parametrize(("override", "error"), [
    ("task.colour=red", r"task.colour: unknown setting of train.task 'say_word' \(known: word, modulus\)"),
    ("task.modulus=1", r"task.modulus: Input should be greater than or equal to 2 \(got 1"),
])
def test_a_task_section_is_validated_in_one_line(tiny_model_dir: Path, tmp_path: Path, override: str,
                                                 error: str) -> None:
    import task_plugin  # noqa: F401  (registers say_word)

    with pytest.raises(UserError, match=error):
        _two_steps(tiny_model_dir, tmp_path, ["train.task=say_word", override])
    with pytest.raises(UserError, match=r"task\.colour: train\.task 'proxy' takes no settings of its own"):
        _two_steps(tiny_model_dir, tmp_path / "proxy", ["task.colour=red"])
