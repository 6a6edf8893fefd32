"""The verl backend: memtrain's tasks (prompts, chunking, IMR, rewards, advantages) trained by verl.

verl (FSDP actor + vLLM/SGLang rollout servers on a Ray cluster) does the distributed work; memtrain keeps the
one implementation of everything that defines the method:

- :mod:`.agent_loop` - a verl agent loop that runs memtrain's task (``memtrain.rl.tasks``) for one
  session against verl's rollout servers and returns one output per model call (memory steps, final step,
  IMR answers);
- :mod:`.estimator` - the ``memtrain_joint`` advantage estimator (the groups of ``memtrain.rl.core``) and the
  ``memtrain_sync`` trainer mode that feeds it the per-output group information;
- :mod:`.data` and :mod:`.config` - the verl dataset and Hydra config rendered from a memtrain config;
- :mod:`.launch` - ``memtrain train --backend verl``.

Only :mod:`.agent_loop`, :mod:`.estimator` and :mod:`.plugin` import verl; verl lives in its own environment
(``pip install "memtrain[verl]"``, see docs/verl.md).
"""

AGENT_NAME = "memtrain_agent"
ESTIMATOR_NAME = "memtrain_joint"
TRAINER_MODE = "memtrain_sync"
PLUGIN_MODULE = "memtrain.backends.verl.plugin"
ROW_COLUMN = "memtrain_row"  # verl dataset column holding the memtrain row as JSON
META_KEY = "memtrain"        # AgentLoopOutput.extra_fields key with the output's rollout/group/reward
CONFIG_SECTION = "memtrain"  # top-level section of the rendered verl config read by the memtrain_sync trainer
