"""HFEngine: batched KV-cache decoding whose log-probs equal a plain full forward pass under the sampling
distribution (what the trainer recomputes), per-row stopping, sampling controls and seeding, on the tiny real
checkpoint and SmolLM2."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from memtrain.config import EngineConfig
from memtrain.engines import make_engine
from memtrain.engines.base import Completion, GenerationRequest, SamplingParams
from memtrain.engines.hf import HFEngine, join_caches, prefill_groups, sample_tokens, sequence_seed
from memtrain.models import load_policy, load_tokenizer

TOL = 1e-4
PROMPTS = [
    "Hi",
    "Paris is the capital of France. What is the capital of Germany?",
    "The memory agent reads a long document chunk by chunk and rewrites its memory at every step. Why?",
    "Question: which entity does [MASK] stand for in 'The [MASK] Tower'?",
]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir: Path) -> tuple[Any, Any]:
    return load_policy(str(tiny_model_dir), device="cpu"), load_tokenizer(str(tiny_model_dir))


def _ids(tokenizer: Any, user: str) -> list[int]:
    """A single-turn chat prompt, as the agent builds them."""
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": user}], add_generation_prompt=True, tokenize=False
    )
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _text(tokenizer: Any, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def nucleus_logprob(logp: torch.Tensor, token: int, top_p: float) -> float:
    """log p(token) under the top-p nucleus of one row of log-probs, renormalised, written out plainly: walk
    the tokens from the most likely, keeping each while the mass before it is <= top_p."""
    probs = logp.exp().tolist()
    kept, mass = [], 0.0
    for i in sorted(range(len(probs)), key=lambda i: -probs[i]):
        if mass > top_p:
            break
        kept.append(i)
        mass += probs[i]
    assert token in kept, "a token outside the nucleus was sampled"
    return float(logp[token]) - float(torch.logsumexp(logp[kept], dim=0))


def full_forward_logprobs(model: Any, prompt: list[int], completion: list[int],
                          params: SamplingParams | None = None) -> torch.Tensor:
    """One unpadded forward over prompt + completion; log-probs under the distribution each token was sampled
    from: log_softmax(logits / T), the top-p nucleus renormalised; raw logits for greedy (T = 0)."""
    params = params or SamplingParams()
    with torch.no_grad():
        logits = model(torch.tensor([prompt + completion])).logits[0].float()
    temperature = params.temperature if params.temperature > 0 else 1.0
    logp = torch.log_softmax(logits[len(prompt) - 1 : -1] / temperature, dim=-1)
    if params.temperature > 0 and params.top_p < 1.0:
        pairs = zip(logp, completion, strict=True)
        return torch.tensor([nucleus_logprob(row, t, params.top_p) for row, t in pairs])
    return logp.gather(1, torch.tensor(completion)[:, None]).squeeze(1)


def assert_exact_logprobs(
    model: Any, requests: list[GenerationRequest], results: list[list[Completion]]
) -> None:
    for request, completions in zip(requests, results, strict=True):
        for c in completions:
            assert len(c.logprobs) == len(c.token_ids) > 0
            expected = full_forward_logprobs(model, request.prompt_ids, c.token_ids, request.params)
            diff = (expected - torch.tensor(c.logprobs)).abs().max().item()
            assert diff < TOL, f"log-prob mismatch {diff:.2e} for prompt of {len(request.prompt_ids)} tokens"


def test_logprobs_equal_full_forward_for_mixed_batch(tiny: tuple[Any, Any]) -> None:
    model, tok = tiny
    # the unseeded request samples from torch's global generator: fix it, or whether this random-weight
    # model samples its stop token (and so ends before max_tokens) depends on the tests that ran before
    torch.manual_seed(0)
    engine = HFEngine(model, tok, batch_size=3)  # 10 sequences -> 4 chunks, some prompts split across chunks
    requests = [
        GenerationRequest(
            _ids(tok, PROMPTS[0]), SamplingParams(n=3, temperature=0.7, top_p=0.9, max_tokens=12, seed=1)
        ),
        GenerationRequest(_ids(tok, PROMPTS[1]), SamplingParams(temperature=0.0, max_tokens=9)),
        GenerationRequest(_ids(tok, PROMPTS[2]), SamplingParams(n=2, temperature=1.0, max_tokens=15)),
        GenerationRequest(
            _ids(tok, PROMPTS[3]), SamplingParams(n=4, temperature=1.3, top_p=0.5, max_tokens=7, seed=2)
        ),
    ]
    assert len({len(r.prompt_ids) for r in requests}) == 4
    results = engine.generate(requests)
    assert [len(cs) for cs in results] == [3, 1, 2, 4]
    for request, completions in zip(requests, results, strict=True):
        for c in completions:
            assert len(c.token_ids) == request.params.max_tokens and c.finish_reason == "length"
            assert c.text == _text(tok, c.token_ids)
    assert_exact_logprobs(model, requests, results)
    # Sampling-distribution semantics: the raw logits (the old convention) give different numbers.
    c = results[0][0]
    raw = full_forward_logprobs(model, requests[0].prompt_ids, c.token_ids)
    assert (raw - torch.tensor(c.logprobs)).abs().max().item() > 1e-3


def test_logprobs_at_temperature_equal_the_trainers_recomputation(tiny: tuple[Any, Any]) -> None:
    """At T = 0.7 the engine reports log_softmax(logits / 0.7) of the sampled tokens, exactly what the trainer
    recomputes (``sequence_logprobs`` at rl.temperature); not the raw-logit log-probs (T = 1)."""
    from memtrain.rl.logprobs import sequence_logprobs
    from memtrain.rl.rollout import TrainSequence

    model, tok = tiny
    requests = [GenerationRequest(_ids(tok, p), SamplingParams(n=3, temperature=0.7, max_tokens=10, seed=5))
                for p in PROMPTS]
    results = HFEngine(model, tok, batch_size=4).generate(requests)
    seqs = [TrainSequence(r.prompt_ids, c.token_ids, 0.0, c.logprobs)
            for r, cs in zip(requests, results, strict=True) for c in cs]
    tempered = sequence_logprobs(model, seqs, micro_batch_tokens=64, temperature=0.7)
    raw = sequence_logprobs(model, seqs, micro_batch_tokens=64)
    for s, t, r in zip(seqs, tempered, raw, strict=True):
        assert s.old_logprobs is not None
        engine = torch.tensor(s.old_logprobs)
        assert (engine - t).abs().max().item() < TOL
        assert (engine - r).abs().max().item() > 1e-3  # the test can tell the two conventions apart


def test_prefill_groups_fit_the_budget() -> None:
    assert prefill_groups([3, 4, 5, 9, 20], None) == [[0, 1, 2, 3, 4]]
    # rows x longest <= 12: [3, 4] = 8 fits, + 5 would be 15; [5, 9] would be 18; 20 > 12 stays alone
    assert prefill_groups([3, 4, 5, 9, 20], 12) == [[0, 1], [2], [3], [4]]
    assert prefill_groups([2, 2, 2, 2], 8) == [[0, 1, 2, 3]]
    assert prefill_groups([], 8) == []


def test_grouped_prefill_gives_the_same_completions(tiny: tuple[Any, Any]) -> None:
    """Prefill in groups whose caches are joined (left-padded to the widest): the same greedy tokens and
    log-probs as one batched prefill, still equal to a full forward; n > 1 rows share their group's row."""
    model, tok = tiny
    requests = [GenerationRequest(_ids(tok, p), SamplingParams(n=1 + i % 2, temperature=0.0, max_tokens=8))
                for i, p in enumerate(PROMPTS)]
    lengths = sorted(len(r.prompt_ids) for r in requests)
    assert len(prefill_groups(lengths, 2 * lengths[1])) >= 3  # really split
    one = HFEngine(model, tok, prefill_tokens=None)
    one.prefill_tokens = None  # one prefill even on CPU
    split = HFEngine(model, tok, prefill_tokens=2 * lengths[1])
    a, b = one.generate(requests), split.generate(requests)
    assert split._split_prefill  # the tiny Llama's cache was joined, not re-run as one batch
    for ca, cb in zip(a, b, strict=True):
        assert [c.token_ids for c in ca] == [c.token_ids for c in cb]
        for x, y in zip(ca, cb, strict=True):
            assert max(abs(u - v) for u, v in zip(x.logprobs, y.logprobs, strict=True)) < TOL
    assert_exact_logprobs(model, requests, b)
    assert HFEngine(model, tok).prefill_tokens == 2048  # the CPU default
    with pytest.raises(ValueError, match="prefill_tokens=0"):
        HFEngine(model, tok, prefill_tokens=0)


def test_caches_that_cannot_be_joined_fall_back_to_one_prefill(tiny: tuple[Any, Any],
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    import memtrain.engines.hf as hf

    model, tok = tiny
    assert join_caches([object(), object()], [3, 4]) is None
    params = SamplingParams(temperature=0.0, max_tokens=5)
    requests = [GenerationRequest(_ids(tok, p), params) for p in PROMPTS]
    expected = HFEngine(model, tok, prefill_tokens=10_000).generate(requests)
    engine = HFEngine(model, tok, prefill_tokens=1)  # every prompt its own group
    monkeypatch.setattr(hf, "join_caches", lambda caches, widths: None)  # as for a sliding-window cache
    got = engine.generate(requests)
    assert not engine._split_prefill  # remembered: later batches prefill in one forward
    assert [[c.token_ids for c in cs] for cs in got] == [[c.token_ids for c in cs] for cs in expected]


def test_greedy_is_argmax_of_full_forward(tiny: tuple[Any, Any]) -> None:
    model, tok = tiny
    requests = [
        GenerationRequest(_ids(tok, p), SamplingParams(temperature=0.0, max_tokens=6)) for p in PROMPTS
    ]
    results = HFEngine(model, tok).generate(requests)
    for request, (c,) in zip(requests, results, strict=True):
        with torch.no_grad():
            logits = model(torch.tensor([request.prompt_ids + c.token_ids])).logits[0]
        argmax = logits[len(request.prompt_ids) - 1 : -1].argmax(dim=-1).tolist()
        assert c.token_ids == argmax
    assert_exact_logprobs(model, requests, results)


def test_tiny_top_p_is_greedy(tiny: tuple[Any, Any]) -> None:
    model, tok = tiny
    engine = HFEngine(model, tok)
    prompt = _ids(tok, PROMPTS[1])
    greedy = engine.generate([GenerationRequest(prompt, SamplingParams(temperature=0.0, max_tokens=8))])
    nucleus = engine.generate(
        [GenerationRequest(prompt, SamplingParams(n=3, temperature=1.0, top_p=1e-6, max_tokens=8))]
    )
    assert all(c.token_ids == greedy[0][0].token_ids for c in nucleus[0])


def test_sampler_follows_temperature_and_top_p() -> None:
    """The exponential-race sampler draws from softmax(logits / T) restricted to the top-p nucleus."""
    probs = torch.tensor([0.5, 0.3, 0.2])
    rows = 20000
    logits = probs.log().repeat(rows, 1)
    torch.manual_seed(0)

    def freqs(temperature: float, top_p: float, expected: torch.Tensor) -> torch.Tensor:
        temps = torch.full((rows,), temperature)
        top_ps = torch.full((rows,), top_p)
        tokens, logps = sample_tokens(logits, temps, top_ps, [None] * rows)
        # the log-prob of the drawn token under the distribution it was drawn from
        assert torch.allclose(logps, expected.log()[tokens])
        return torch.bincount(tokens, minlength=3).float() / rows

    assert torch.allclose(freqs(1.0, 1.0, probs), probs, atol=0.015)
    sharpened = probs**2 / (probs**2).sum()
    assert torch.allclose(freqs(0.5, 1.0, sharpened), sharpened, atol=0.015)
    nucleus = torch.tensor([0.625, 0.375, 0.0])
    assert torch.allclose(freqs(1.0, 0.6, nucleus), nucleus, atol=0.015)
    assert torch.equal(freqs(0.0, 1.0, probs), torch.tensor([1.0, 0.0, 0.0]))  # greedy: raw log-probs


def test_eos_from_generation_config_stops_each_row(tiny: tuple[Any, Any]) -> None:
    model, tok = tiny
    engine = HFEngine(model, tok, batch_size=8)
    requests = [
        GenerationRequest(_ids(tok, p), SamplingParams(temperature=1.0, max_tokens=16, seed=7 + i))
        for i, p in enumerate(PROMPTS)
    ]
    reference = [cs[0].token_ids for cs in engine.generate(requests)]
    base_eos = set(engine.eos_token_ids)

    def first_stop(ids: list[int], eos: set[int]) -> int:
        return next((k + 1 for k, t in enumerate(ids) if t in eos), len(ids))

    # Declare as an extra EOS a token that ends the rows at different lengths.
    extra = next(
        t
        for t in reference[0][2:]
        if t not in base_eos and len({first_stop(ids, base_eos | {t}) for ids in reference}) >= 2
    )
    eos = base_eos | {extra}
    saved = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = [*base_eos, extra]
    try:
        assert engine.eos_token_ids == eos
        results = engine.generate(requests)
    finally:
        model.generation_config.eos_token_id = saved
    lengths = []
    for ref, (c,) in zip(reference, results, strict=True):
        end = first_stop(ref, eos)
        lengths.append(end)
        assert c.token_ids == ref[:end]
        if ref[end - 1] in eos:
            assert c.finish_reason == "stop"  # EOS kept in the ids/log-probs, not in the text
            assert c.text == _text(tok, ref[: end - 1])
        else:
            assert c.finish_reason == "length" and end == 16
    assert len(set(lengths)) >= 2
    assert_exact_logprobs(model, requests, results)


def test_max_tokens_gives_length(tiny: tuple[Any, Any]) -> None:
    model, tok = tiny
    engine = HFEngine(model, tok)
    requests = [
        GenerationRequest(_ids(tok, PROMPTS[1]), SamplingParams(temperature=0.0, max_tokens=5)),
        GenerationRequest(_ids(tok, PROMPTS[2]), SamplingParams(temperature=0.0, max_tokens=0)),
        GenerationRequest(_ids(tok, PROMPTS[3]), SamplingParams(temperature=0.0, max_tokens=1)),
    ]
    (a,), (b,), (c,) = engine.generate(requests)
    assert (len(a.token_ids), a.finish_reason) == (5, "length")
    assert (b.token_ids, b.logprobs, b.text, b.finish_reason) == ([], [], "", "length")
    assert (len(c.token_ids), c.finish_reason) == (1, "length")


def test_stop_string_cuts_text_and_keeps_sampled_tokens(tiny: tuple[Any, Any]) -> None:
    model, tok = tiny
    engine = HFEngine(model, tok)
    params = SamplingParams(temperature=1.0, max_tokens=24, seed=3)
    prompt = _ids(tok, PROMPTS[2])
    ((ref,),) = engine.generate([GenerationRequest(prompt, params)])
    text = ref.text
    start = next(
        i for i in range(4, len(text) - 1) if text[i : i + 2].isascii() and text[i : i + 2].isprintable()
    )
    stop = text[start : start + 2]
    expected_len = next(k for k in range(1, len(ref.token_ids) + 1) if stop in _text(tok, ref.token_ids[:k]))
    stopped = GenerationRequest(
        prompt, SamplingParams(temperature=1.0, max_tokens=24, seed=3, stop=("@@", stop))
    )
    ((c,),) = engine.generate([stopped])
    assert c.finish_reason == "stop"
    assert c.token_ids == ref.token_ids[:expected_len]
    assert c.text == text[: text.find(stop)]
    assert_exact_logprobs(model, [stopped], [[c]])


def test_seeded_sampling_is_reproducible_and_batch_independent(tiny: tuple[Any, Any]) -> None:
    model, tok = tiny
    engine = HFEngine(model, tok, batch_size=4)
    seeded = GenerationRequest(
        _ids(tok, PROMPTS[3]), SamplingParams(n=3, temperature=1.0, max_tokens=10, seed=11)
    )
    others = [
        GenerationRequest(_ids(tok, p), SamplingParams(n=2, temperature=1.0, max_tokens=12)) for p in PROMPTS
    ]
    alone = engine.generate([seeded])[0]
    again = engine.generate([seeded])[0]
    mixed = engine.generate([others[0], seeded, *others[1:]])[1]
    ids = [c.token_ids for c in alone]
    assert ids == [c.token_ids for c in again] == [c.token_ids for c in mixed]
    assert len({tuple(i) for i in ids}) == 3  # the n samples use distinct streams
    other_seed = GenerationRequest(
        seeded.prompt_ids, SamplingParams(n=3, temperature=1.0, max_tokens=10, seed=12)
    )
    assert [c.token_ids for c in engine.generate([other_seed])[0]] != ids
    assert sequence_seed(11, 0) != sequence_seed(11, 1) != sequence_seed(12, 0)


def test_train_mode_restored_and_no_graph(tiny: tuple[Any, Any]) -> None:
    model, tok = tiny
    engine = HFEngine(model, tok)
    model.train()
    model.model.layers[0].eval()  # a mixed state must come back exactly
    before = [(name, m.training) for name, m in model.named_modules()]
    seen: list[bool] = []
    hook = model.register_forward_hook(
        lambda mod, args, out: seen.append(mod.training or torch.is_grad_enabled())
    )
    try:
        engine.generate([GenerationRequest(_ids(tok, PROMPTS[0]), SamplingParams(max_tokens=3, seed=0))])
    finally:
        hook.remove()
        after = [(name, m.training) for name, m in model.named_modules()]
        model.eval()
    assert seen and not any(seen)  # every forward ran in eval mode without autograd
    assert after == before
    assert all(p.grad is None for p in model.parameters())


def test_bad_request_is_named(tiny: tuple[Any, Any]) -> None:
    model, tok = tiny
    engine = HFEngine(model, tok)
    good = GenerationRequest(_ids(tok, PROMPTS[0]), SamplingParams(max_tokens=2))
    with pytest.raises(ValueError, match="generation request 1: prompt_ids is empty"):
        engine.generate([good, GenerationRequest([], SamplingParams())])
    with pytest.raises(ValueError, match=r"generation request 0: params\.top_p=0"):
        engine.generate([GenerationRequest(good.prompt_ids, SamplingParams(top_p=0.0))])


def test_make_engine_hf_wraps_the_given_model(tiny: tuple[Any, Any], tiny_model_dir: Path) -> None:
    model, tok = tiny
    engine = make_engine(
        EngineConfig(kind="hf", batch_size=5), str(tiny_model_dir), model=model, tokenizer=tok
    )
    assert isinstance(engine, HFEngine) and engine.model is model and engine.batch_size == 5
    loaded = make_engine(EngineConfig(kind="hf"), str(tiny_model_dir))
    assert isinstance(loaded, HFEngine) and loaded.model is not model
    request = GenerationRequest(_ids(tok, PROMPTS[1]), SamplingParams(temperature=0.0, max_tokens=4))
    assert loaded.generate([request])[0][0].token_ids == engine.generate([request])[0][0].token_ids


@pytest.mark.slow
def test_smollm2_answers_paris_with_exact_logprobs(smollm2_dir: str) -> None:
    tok = load_tokenizer(smollm2_dir)
    model = load_policy(smollm2_dir, dtype="float32", device="cpu")
    requests = [
        GenerationRequest(
            _ids(tok, "What is the capital of France?"), SamplingParams(temperature=0.0, max_tokens=20)
        ),
        GenerationRequest(
            _ids(tok, "Say hello."), SamplingParams(n=2, temperature=1.0, max_tokens=6, seed=0)
        ),
    ]
    results = HFEngine(model, tok).generate(requests)
    answer = results[0][0]
    assert "Paris" in answer.text
    assert "<|im_end|>" not in answer.text
    assert_exact_logprobs(model, requests, results)
