"""Language-model scoring of packed blocks: summed NLL, target count and correct argmax predictions.

``BlockScorer`` is a Ray Data actor (the model loads once per actor) and computes the same
``NextTokenLoss`` the trainer validates with, so eval's perplexity is the trainer's, on any device.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from rayllm.model.engine import DTYPES, resolve_dtype
from rayllm.rundir import INPUT_IDS, LOSS_MASK, POSITION_IDS, packed_columns


class BlockScorer:
    def __init__(self, model_dir: str, dtype: str = "auto") -> None:
        import torch
        from transformers import AutoModelForCausalLM

        from rayllm.model.loss import NextTokenLoss, resolve_impl

        self.torch = torch
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if self.device.type == "cpu":
            torch.set_num_threads(1)
        dtype = resolve_dtype(dtype, gpu=self.device.type == "cuda")
        lm = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, DTYPES[dtype]))
        lm = lm.to(self.device).eval()
        self.objective = NextTokenLoss(lm, resolve_impl("auto", lm, torch.device("cpu")))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One output row per batch of blocks: the driver only needs the sums."""
        from rayllm.model.loss import shift

        torch = self.torch
        cols = packed_columns(batch)
        t = {k: torch.from_numpy(v.astype(np.int64)).to(self.device) for k, v in cols.items()}
        inputs, targets = shift(t[INPUT_IDS], t.get(LOSS_MASK))
        pos = t[POSITION_IDS][:, :-1] if POSITION_IDS in t else None
        with torch.no_grad():
            nll, count, correct = self.objective(inputs, targets, pos, accuracy=True)
        return {
            "nll": np.array([nll.double().item()]),
            "tokens": np.array([count.item()]),
            "correct": np.array([correct.item()]),
        }


def totals(scored: Any) -> np.ndarray:
    """(NLL, tokens, correct) summed over every scored batch (a Ray dataset of BlockScorer rows)."""
    out = np.zeros(3, dtype=np.float64)
    for b in scored.iter_batches(batch_format="numpy", batch_size=None):
        out += [b["nll"].sum(), b["tokens"].sum(), b["correct"].sum()]
    return out
