"""Plain Hugging Face causal LMs: build.py (shape from the config or a local folder, context length,
FLOPs per token) and loss.py (the one next-token loss, full or chunked over the vocabulary)."""
