"""Evaluation of memory agents on long-document QA and search-based QA."""
