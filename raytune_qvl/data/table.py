"""Encoded samples as an Arrow IPC file, read through a memory map: the columns are never parsed
into Python objects, every rank and every DataLoader worker on a node shares the same page-cache
pages, and a row becomes an `Encoded` only when it is asked for. Written in record batches while
the split is encoded, so the preparer never holds the whole split either."""

from __future__ import annotations

import hashlib
from array import array
from pathlib import Path
from typing import Any, Iterator, Sequence, overload

from raytune_qvl.data.encode import Encoded

__all__ = ["EncodedWriter", "EncodedRows"]

_BATCH_ROWS = 1024  # rows per record batch while writing


def _schema() -> Any:
    import pyarrow as pa

    return pa.schema(
        [
            ("input_ids", pa.list_(pa.int32())),
            ("labels", pa.list_(pa.int32())),
            ("image_grid_thw", pa.list_(pa.list_(pa.int32()))),
            ("images", pa.list_(pa.string())),
            ("prompt_len", pa.int32()),
            ("answer", pa.string()),
            ("id", pa.string()),
            ("line", pa.int64()),
            ("image_tokens", pa.int32()),
        ]
    )


class EncodedWriter:
    """Appends `Encoded` rows to an Arrow IPC file in record batches (`add`, then `close`)."""

    def __init__(self, path: Path):
        import pyarrow as pa

        self.schema = _schema()
        self.path = path
        self._sink = pa.OSFile(str(path), "wb")
        self._writer = pa.ipc.new_file(self._sink, self.schema)
        self._rows: list[Encoded] = []
        self.count = 0
        self._digest = hashlib.blake2b(digest_size=10)

    def add(self, item: Encoded) -> None:
        self._rows.append(item)
        self.count += 1
        for values in (item.input_ids, item.labels, [n for grid in item.image_grid_thw for n in grid]):
            self._digest.update(len(values).to_bytes(4, "little") + array("i", values).tobytes())

    def digest(self) -> str:
        """A hash of every row's token ids, labels and image grids, in order: what the ranks
        compare (the same data on two nodes gives the same digest, whatever the files' mtimes)."""
        return self._digest.hexdigest()
        if len(self._rows) >= _BATCH_ROWS:
            self._flush()

    def _flush(self) -> None:
        import pyarrow as pa

        if not self._rows:
            return
        columns = {name: [getattr(e, name) for e in self._rows] for name in self.schema.names}
        self._writer.write_batch(pa.RecordBatch.from_pydict(columns, schema=self.schema))
        self._rows = []

    def close(self) -> None:
        self._flush()
        self._writer.close()
        self._sink.close()


class EncodedRows(Sequence[Encoded]):
    """A read-only sequence of `Encoded` over a memory-mapped Arrow IPC file. Pickles as its path
    (a DataLoader worker started by spawn or forkserver maps the same file again)."""

    def __init__(self, path: str | Path):
        import pyarrow as pa

        self.path = str(path)
        self._table = pa.ipc.open_file(pa.memory_map(self.path, "r")).read_all()  # zero-copy views
        self._columns = {name: self._table.column(name) for name in self._table.column_names}
        self._chunk_starts: list[int] = []
        start = 0
        for chunk in self._table.column("id").chunks:
            self._chunk_starts.append(start)
            start += len(chunk)

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (EncodedRows, (self.path,))

    def __len__(self) -> int:
        return self._table.num_rows

    def _locate(self, index: int) -> tuple[int, int]:
        import bisect

        chunk = bisect.bisect_right(self._chunk_starts, index) - 1
        return chunk, index - self._chunk_starts[chunk]

    def _row(self, index: int) -> Encoded:
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(index)
        chunk, offset = self._locate(index)
        values = {name: column.chunk(chunk)[offset].as_py() for name, column in self._columns.items()}
        return Encoded(**values)

    @overload
    def __getitem__(self, index: int) -> Encoded: ...

    @overload
    def __getitem__(self, index: slice) -> list[Encoded]: ...

    def __getitem__(self, index: int | slice) -> Encoded | list[Encoded]:
        if isinstance(index, slice):
            return [self._row(i) for i in range(*index.indices(len(self)))]
        return self._row(index)

    def __iter__(self) -> Iterator[Encoded]:
        for i in range(len(self)):
            yield self._row(i)

    def lengths(self) -> list[int]:
        """Tokens per row, from the list offsets of `input_ids` (no row is built)."""
        import pyarrow.compute as pc

        return pc.list_value_length(self._columns["input_ids"]).to_pylist()

    def column(self, name: str) -> Any:
        """One column as a pyarrow ChunkedArray (for statistics without building rows)."""
        return self._columns[name]
