"""Every prompt the agent sees, in one module used by training, evaluation and inference alike.

The wording is ours; the structure follows MEMTRAIN.md: memory-update steps see [instruction, problem,
previous memory, chunk], the final step sees [instruction, problem, memory] and answers in \\boxed{},
the intermediate-recall step sees [memory, chunk with [TARGET]].
"""

from __future__ import annotations

MASK_TOKEN = "[MASK]"
TARGET_TOKEN = "[TARGET]"

PROXY_QUESTION = (
    f"Every occurrence of one entity in the article has been replaced by the placeholder {MASK_TOKEN}. "
    f"Based on the whole article, which entity does {MASK_TOKEN} stand for?"
)
