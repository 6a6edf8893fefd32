"""Imported by verl in every process (``VERL_USE_EXTERNAL_MODULES``): registers memtrain's agent loop,
advantage estimator and trainer mode in verl's registries."""

from memtrain.backends.verl import agent_loop, estimator

__all__ = ["agent_loop", "estimator"]
