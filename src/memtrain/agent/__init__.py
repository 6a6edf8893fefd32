"""The context-memory agent shared by training, evaluation and inference.

``MemoryAgent.run`` (``loop``) reads documents chunk by chunk (``chunking``) with the prompts of
``memtrain.prompts`` and returns ``Trajectory`` objects (``types``); ``imr`` builds and samples the
intermediate-memory-recall prompts of the second proxy task.
"""

from memtrain.agent.chunking import ChunkedDocument, chunk_document
from memtrain.agent.imr import ImrPrompt, build_imr_prompt, run_imr
from memtrain.agent.loop import MemoryAgent
from memtrain.agent.types import Trajectory, Turn

__all__ = ["ChunkedDocument", "ImrPrompt", "MemoryAgent", "Trajectory", "Turn", "build_imr_prompt",
           "chunk_document", "run_imr"]
