"""What one run of the memory agent produces: every turn exactly as sampled, plus the memories and scores.

The trainer turns each :class:`Turn` into one training sequence (``prompt_ids + completion_ids``) and uses
``logprobs`` as the sampler's old log-probs, so both are stored exactly as the engine saw and produced them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, get_args

TurnKind = Literal["memory", "final", "imr", "search"]
TURN_KINDS: tuple[str, ...] = get_args(TurnKind)  # the one list: training sequences and statistics use it


@dataclass
class Turn:
    kind: TurnKind
    step: int                 # memory turn t (0-based chunk index); final turn = number of chunks; imr = k
    prompt_ids: list[int]     # exactly the tokens the engine was given (chat template applied)
    completion_ids: list[int]  # exactly the sampled tokens (EOS included when sampled)
    logprobs: list[float]     # sampler's log-probs of completion_ids
    text: str
    hit_cap: bool             # stopped by max_tokens


@dataclass
class Trajectory:
    sample_index: int         # index of the sample in the list given to run()
    sample_id: str
    chunks: list[str]         # chunk texts actually read (after truncation)
    chunk_char_spans: list[tuple[int, int]]  # each chunk's [start, end) in the sample's context string
    memories: list[str]       # memories[0] = the initial "no previous memory" text; [t+1] = after chunk t
    turns: list[Turn]         # memory turns in order, then the final turn
    answer: str               # final turn text
    scores: dict[str, float]  # memtrain.scoring.score(answer, sample["answers"]) (all METRICS); {} if no gold
    truncated: bool
    num_doc_tokens: int = 0   # tokens of the whole document (before truncation)
    golds: list[str] = field(default_factory=list)  # the sample's gold answers (what a reward scores against)
    empty_memories: list[int] = field(default_factory=list)  # steps whose memory output was empty

    @property
    def memory_turns(self) -> list[Turn]:
        return [t for t in self.turns if t.kind == "memory"]

    @property
    def final_turn(self) -> Turn:
        return self.turns[-1]
