"""The context-memory agent shared by training, evaluation and inference."""
