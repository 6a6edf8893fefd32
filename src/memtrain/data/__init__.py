"""Training and evaluation data: corpora, proxy-task documents (MemTrain), long-document and search QA."""
