"""Packing: concatenate tokenized documents (each ending in EOS) into fixed-length blocks.

Blocks are ``seq_len + 1`` tokens (inputs plus the shifted label) and cross document boundaries,
so there is no padding. Packing is a single ordered stream, run in the driver on token arrays that
Ray Data tokenized in parallel: cheap (numpy slicing) and the reason shards are byte-identical
for the same input. Only the final partial block per split is left out, and it is reported.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROW_GROUP = 1024


class ShardWriter:
    """Writes ``<dir>/<split>/shard-NNNNN.parquet`` files of ``shard_rows`` blocks each."""

    def __init__(
        self, out_dir: Path, split: str, block_len: int, shard_rows: int, boundaries_eos: int | None = None
    ) -> None:
        self.dir = out_dir / split
        self.dir.mkdir(parents=True, exist_ok=True)
        self.split = split
        self.block_len = block_len
        self.shard_rows = shard_rows
        self.boundaries_eos = boundaries_eos
        self.shards: list[dict[str, Any]] = []

    def write(self, blocks: np.ndarray) -> None:
        path = self.dir / f"shard-{len(self.shards):05d}.parquet"
        columns = {"input_ids": self._column(blocks)}
        if self.boundaries_eos is not None:
            columns["position_ids"] = self._column(position_ids(blocks, self.boundaries_eos))
        table = pa.table(columns)
        pq.write_table(table, path, compression="zstd", row_group_size=ROW_GROUP, write_statistics=False)
        self.shards.append(
            {
                "path": f"{self.split}/{path.name}",
                "split": self.split,
                "rows": int(blocks.shape[0]),
                "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
            }
        )

    def _column(self, blocks: np.ndarray) -> pa.FixedSizeListArray:
        return pa.FixedSizeListArray.from_arrays(
            pa.array(blocks.reshape(-1), type=pa.int32()), self.block_len
        )


def position_ids(blocks: np.ndarray, eos_id: int) -> np.ndarray:
    """Positions that restart after every EOS (and at each block start): document boundaries that
    attention can be masked on, and RoPE/learned positions that do not run across documents."""
    idx = np.broadcast_to(np.arange(blocks.shape[1]), blocks.shape)
    starts = np.zeros(blocks.shape, dtype=bool)
    starts[:, 0] = True
    starts[:, 1:] = blocks[:, :-1] == eos_id
    last_start = np.maximum.accumulate(np.where(starts, idx, 0), axis=1)
    return (idx - last_start).astype(np.int32)


class Packer:
    """Accumulates token arrays; emits full shards as soon as they are complete (bounded memory)."""

    def __init__(self, writer: ShardWriter) -> None:
        self.writer = writer
        self.block_len = writer.block_len
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
        shard_tokens = self.block_len * self.writer.shard_rows
        if self.pending_tokens >= shard_tokens:
            buf = np.concatenate(self.pending)
            n_shards = len(buf) // shard_tokens
            for k in range(n_shards):
                chunk = buf[k * shard_tokens : (k + 1) * shard_tokens]
                self.writer.write(chunk.reshape(-1, self.block_len))
                self.blocks += self.writer.shard_rows
            rest = buf[n_shards * shard_tokens :]
            self.pending, self.pending_tokens = [rest], len(rest)

    def finish(self) -> int:
        """Write the last (shorter) shard; return the tokens of the final partial block left out."""
        buf = np.concatenate(self.pending) if self.pending else np.zeros(0, np.int32)
        full = len(buf) // self.block_len
        if full:
            self.writer.write(buf[: full * self.block_len].reshape(full, self.block_len))
            self.blocks += full
        self.pending, self.pending_tokens = [], 0
        return len(buf) - full * self.block_len
