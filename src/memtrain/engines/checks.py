"""Request validation shared by the engines: bad sampling settings fail before any model or network call."""

from __future__ import annotations

from memtrain.engines.base import GenerationRequest


def validate_request(index: int, request: GenerationRequest, text_prompt_ok: bool = False) -> None:
    """Fail early, naming the request and field, instead of deep inside the decoding loop or on a server.

    ``text_prompt_ok``: the engine can send ``prompt_text`` instead of ids (a server tokenizes it).
    """
    p = request.params
    where = f"generation request {index}"
    if not request.prompt_ids and not (text_prompt_ok and request.prompt_text):
        raise ValueError(f"{where}: prompt_ids is empty; expected at least one prompt token")
    if p.n < 1:
        raise ValueError(f"{where}: params.n={p.n}; expected >= 1")
    if p.max_tokens < 0:
        raise ValueError(f"{where}: params.max_tokens={p.max_tokens}; expected >= 0")
    if p.temperature < 0:
        raise ValueError(f"{where}: params.temperature={p.temperature}; expected >= 0 (0 means greedy)")
    if not 0.0 < p.top_p <= 1.0:
        raise ValueError(f"{where}: params.top_p={p.top_p}; expected 0 < top_p <= 1")
    if any(not s for s in p.stop):
        raise ValueError(f"{where}: params.stop contains an empty string")


def validate_requests(requests: list[GenerationRequest], text_prompt_ok: bool = False) -> None:
    for i, request in enumerate(requests):
        validate_request(i, request, text_prompt_ok)
