"""Generation engines behind one interface: local transformers, OpenAI-compatible servers, scripted."""

from memtrain.engines.base import Completion, Engine, GenerationRequest, SamplingParams

__all__ = ["Completion", "Engine", "GenerationRequest", "SamplingParams"]
