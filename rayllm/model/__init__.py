"""Plain Hugging Face causal LMs, shared by the stages: build.py (shape from the config or a local
folder, LoRA adapters, context length, FLOPs per token), loss.py (the one next-token loss: full,
chunked or Liger), chat.py (the one chat rendering for prep, eval and serve) and imports.py
(`rayllm import`: a GGUF file or a folder to a plain HF folder)."""
