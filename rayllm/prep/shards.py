"""The packed shards prep writes: parquet files of fixed-size int32 blocks, one column per packed-data
column (``rayllm.rundir`` names them and reads them back), each written under a temporary name and
renamed once complete, its sha256 recorded for the manifest."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from rayllm.rundir import sha256_file

ROW_GROUP = 1024


class ShardWriter:
    """Writes ``<split_dir>/<prefix>-NNNNN.parquet``; ``shards`` lists what it wrote, in order.

    A killed prep never leaves a half-written shard under a name train would read.
    """

    def __init__(self, split_dir: Path, block_len: int, prefix: str = "shard") -> None:
        self.dir = split_dir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.split = split_dir.name
        self.block_len = block_len
        self.prefix = prefix
        self.shards: list[dict[str, Any]] = []

    def write(self, columns: dict[str, np.ndarray]) -> None:
        rows = next(iter(columns.values())).shape[0]
        table = pa.table({name: self._column(values) for name, values in columns.items()})
        path = self.dir / f"{self.prefix}-{len(self.shards):05d}.parquet"
        tmp = path.with_name(path.name + ".tmp")
        pq.write_table(table, tmp, compression="zstd", row_group_size=ROW_GROUP, write_statistics=False)
        tmp.replace(path)
        self.shards.append(
            {
                "path": f"{self.split}/{path.name}",
                "split": self.split,
                "rows": int(rows),
                "sha256": sha256_file(path),
            }
        )

    def _column(self, blocks: np.ndarray) -> pa.FixedSizeListArray:
        return pa.FixedSizeListArray.from_arrays(
            pa.array(blocks.reshape(-1), type=pa.int32()), self.block_len
        )
