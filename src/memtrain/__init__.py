"""memtrain: self-supervised training of LLM agents' context memory (MemTrain, arXiv 2606.03197)."""

__version__ = "0.1.0"
