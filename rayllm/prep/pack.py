"""Packing: concatenate tokenized documents (each ending in EOS) into fixed-length blocks.

Blocks are ``seq_len + 1`` tokens (inputs plus the shifted label) and cross document boundaries,
so there is no padding. Each prep bucket packs its own ordered documents (``take_tail`` hands back
what does not fill a block), and one last pass packs the buckets' tails in bucket order; only its
final partial block per split is left out, and reported. Shards are written by ``ShardWriter``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from rayllm.rundir import INPUT_IDS, LOSS_MASK, POSITION_IDS


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

    def take_tail(self) -> np.ndarray:
        """Write the full blocks still pending (a shorter last shard); return the tokens that do not
        fill a block, for the tail pass."""
        buf = np.concatenate(self.pending) if self.pending else np.zeros(0, np.int32)
        full = len(buf) // self.block_len
        if full:
            self._write(buf[: full * self.block_len].reshape(full, self.block_len))
        self.pending, self.pending_tokens = [], 0
        return buf[full * self.block_len :]

    def finish(self) -> int:
        """``take_tail`` for the last packer of a split: the tokens of its partial block left out."""
        return len(self.take_tail())

    def _write(self, blocks: np.ndarray) -> None:
        columns = {INPUT_IDS: blocks}
        if self.boundaries_eos is not None:
            columns[POSITION_IDS] = position_ids(blocks, self.boundaries_eos)
        self.writer.write(columns)
        self.blocks += len(blocks)


class ExamplePacker:
    """Fine-tuning examples packed whole into blocks: an example that does not fit in what is left of
    a block starts the next one, and the rest is padding (no loss). Positions restart with every
    example, so attention stays within it; ``loss_mask`` marks the answer tokens."""

    def __init__(self, writer: Any, shard_rows: int, pad_id: int) -> None:
        self.writer, self.shard_rows, self.pad_id = writer, shard_rows, pad_id
        self.block_len = writer.block_len
        self.rows: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self.ids: list[np.ndarray] = []
        self.masks: list[np.ndarray] = []
        self.used = 0
        self.blocks = 0
        self.tokens_in = 0
        self.padding = 0

    def add(self, ids: np.ndarray, mask: np.ndarray) -> None:
        """One example (callers drop those longer than a block)."""
        if self.used + len(ids) > self.block_len:
            self._close_block()
        self.ids.append(ids.astype(np.int32, copy=False))
        self.masks.append(mask.astype(np.int32, copy=False))
        self.used += len(ids)
        self.tokens_in += len(ids)

    def _close_block(self) -> None:
        if not self.ids:
            return
        pad = self.block_len - self.used
        self.padding += pad
        parts = [*self.ids, np.full(pad, self.pad_id, np.int32)]
        positions = [np.arange(len(x), dtype=np.int32) for x in (*self.ids, parts[-1])]
        self.rows.append(
            (
                np.concatenate(parts),
                np.concatenate([*self.masks, np.zeros(pad, np.int32)]),
                np.concatenate(positions),
            )
        )
        self.ids, self.masks, self.used = [], [], 0
        if len(self.rows) == self.shard_rows:
            self._write()

    def _write(self) -> None:
        ids, masks, positions = (np.stack(col) for col in zip(*self.rows, strict=True))
        self.writer.write({INPUT_IDS: ids, LOSS_MASK: masks, POSITION_IDS: positions})
        self.blocks += len(self.rows)
        self.rows = []

    def take_tail(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """Write the closed blocks still pending; return the examples of the open block, for the
        tail pass (where they are packed with other buckets' instead of padded alone)."""
        if self.rows:
            self._write()
        tail = list(zip(self.ids, self.masks, strict=True))
        self.ids, self.masks, self.used = [], [], 0
        return tail

    def finish(self) -> int:
        """Write what is left; returns 0 (no example is cut: the padding is counted apart)."""
        self._close_block()
        if self.rows:
            self._write()
        return 0
