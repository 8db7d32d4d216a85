"""train (Ray Train + DeepSpeed): loop.py (one rank's step, top to bottom), parallel.py (ZeRO,
precision, compile, optimizers, schedules), checkpoint.py (save, restore, reshard), export.py
(ZeRO checkpoint -> Hugging Face folder), stage.py (``run``: checks, the TorchTrainer, the summary)."""
