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
from typing import Literal, Protocol, runtime_checkable


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
