"""Retrieval indexes (BM25 and dense) shared by proxy-data construction and the search agent."""
