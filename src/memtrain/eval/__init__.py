"""Evaluations of memory agents, one module each, registered by name (:mod:`memtrain.eval.registry`)."""
