"""Retrieval indexes (BM25 and dense) shared by proxy-data construction and the search agent."""

# The retriever's index kinds: BM25, or dense embeddings in a FAISS structure ("dense" = exact flat search).
# Here, free of heavy imports, so the CLI can offer them without loading numpy or FAISS.
DENSE_STRUCTURE = {"dense": "flat", "ivf-flat": "ivf-flat", "ivf-pq": "ivf-pq", "hnsw": "hnsw"}
INDEX_KINDS = ("bm25", *DENSE_STRUCTURE)
