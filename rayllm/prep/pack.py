"""Packing: concatenate tokenized documents (each ending in EOS) into fixed-length blocks.

Blocks are ``seq_len + 1`` tokens (inputs plus the shifted label) and cross document boundaries,
so there is no padding. Packing is a single ordered stream, run in the driver on token arrays that
Ray Data tokenized in parallel: cheap (numpy slicing) and the reason shards are byte-identical
for the same input. Only the final partial block per split is left out, and it is reported.
Where the blocks go and in which file format is ``rayllm.rundir``'s (``ShardWriter``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from rayllm.rundir import INPUT_IDS, POSITION_IDS


def position_ids(blocks: np.ndarray, eos_id: int) -> np.ndarray:
    """Positions that restart after every EOS (and at each block start): document boundaries that
    attention is masked on, and RoPE/learned positions that do not run across documents."""
    idx = np.broadcast_to(np.arange(blocks.shape[1]), blocks.shape)
    starts = np.zeros(blocks.shape, dtype=bool)
    starts[:, 0] = True
    starts[:, 1:] = blocks[:, :-1] == eos_id
    last_start = np.maximum.accumulate(np.where(starts, idx, 0), axis=1)
    return (idx - last_start).astype(np.int32)


class Packer:
    """Accumulates token arrays; emits full shards as soon as they are complete (bounded memory).

    ``boundaries_eos``: also write ``position_ids`` that restart after that token.
    """

    def __init__(self, writer: Any, shard_rows: int, boundaries_eos: int | None = None) -> None:
        self.writer = writer
        self.block_len = writer.block_len
        self.shard_rows = shard_rows
        self.boundaries_eos = boundaries_eos
        self.pending: list[np.ndarray] = []
        self.pending_tokens = 0
        self.blocks = 0
        self.tokens_in = 0

    def add(self, tokens: np.ndarray) -> None:
        if not len(tokens):
            return
        self.pending.append(tokens.astype(np.int32, copy=False))
        self.pending_tokens += len(tokens)
        self.tokens_in += len(tokens)
        shard_tokens = self.block_len * self.shard_rows
        if self.pending_tokens >= shard_tokens:
            buf = np.concatenate(self.pending)
            n_shards = len(buf) // shard_tokens
            for k in range(n_shards):
                self._write(buf[k * shard_tokens : (k + 1) * shard_tokens].reshape(-1, self.block_len))
            rest = buf[n_shards * shard_tokens :]
            self.pending, self.pending_tokens = [rest], len(rest)

    def finish(self) -> int:
        """Write the last (shorter) shard; return the tokens of the final partial block left out."""
        buf = np.concatenate(self.pending) if self.pending else np.zeros(0, np.int32)
        full = len(buf) // self.block_len
        if full:
            self._write(buf[: full * self.block_len].reshape(full, self.block_len))
        self.pending, self.pending_tokens = [], 0
        return len(buf) - full * self.block_len

    def _write(self, blocks: np.ndarray) -> None:
        columns = {INPUT_IDS: blocks}
        if self.boundaries_eos is not None:
            columns[POSITION_IDS] = position_ids(blocks, self.boundaries_eos)
        self.writer.write(columns)
        self.blocks += len(blocks)
