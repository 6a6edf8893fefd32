"""The one small interface every generation engine implements.

Training, evaluation and ``memtrain answer`` only ever call ``Engine.generate``: a batch of requests in,
``n`` completions per request out, each with the sampled token ids, their text and the per-token
log-probabilities the sampler used (the trainer's importance ratio depends on those being exact).

``Completion.logprobs`` are log-probs under the SAMPLING distribution: log_softmax(logits / temperature),
restricted to the top-p nucleus and renormalised when top_p < 1 (vLLM's ``--logprobs-mode
processed_logprobs``). Greedy requests (temperature 0) report log_softmax of the raw logits instead (the
point mass would give 0 everywhere). The trainer recomputes softmax(logits / rl.temperature) and refuses
rl.top_p < 1, so at any training temperature the two agree.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable


@dataclass(frozen=True)
class SamplingParams:
    n: int = 1
    temperature: float = 1.0  # 0 => greedy
    top_p: float = 1.0
    max_tokens: int = 256
    stop: tuple[str, ...] = ()
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass
class GenerationRequest:
    """A prompt as token ids (what the trainer scores) plus its text (what a server may need)."""

    prompt_ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    prompt_text: str | None = None


@dataclass
class Completion:
    token_ids: list[int]
    text: str
    # log p(token_ids[i] | prompt, token_ids[:i]) under the sampling distribution (see the module docstring)
    logprobs: list[float]
    finish_reason: Literal["stop", "length"]


@runtime_checkable
class Engine(Protocol):
    def generate(self, requests: list[GenerationRequest]) -> list[list[Completion]]:
        """Return, for each request, ``request.params.n`` completions."""
        ...


@runtime_checkable
class PolicyFollower(Protocol):
    """An engine the trainer can keep sampling from the policy it updates (the optional part of Engine).

    ``sync_weights(model)`` is called once before the first rollout and after every optimizer step: afterwards
    the engine must sample from ``model``'s current weights (the HF engine wraps the model itself, so it has
    nothing to copy; the vLLM engine reloads them and checks the copy). It returns numbers for the step's
    metrics row (e.g. ``sync_s``), and raises on a sync it cannot verify. An engine without it (a remote
    server) cannot be trained with; the trainer says so before the first step.

    An engine that holds memory the update needs may also have ``release_memory()``, to be called after the
    rollouts and before the update (the vLLM engine on a GPU sleeps until the next sync or generate).
    """

    def sync_weights(self, model: Any) -> dict[str, float]:
        ...


def can_follow_policy(engine: Engine) -> bool:
    """Whether the trainer can keep ``engine`` in step with the policy (it implements ``sync_weights``)."""
    return callable(getattr(engine, "sync_weights", None))
