"""A run's step and request records as columns: summarised, written and turned into DataFrames
without importing pandas until someone asks for a DataFrame.

Both engines' serving loop (``sim.loop``) collects one dict per pass and per request;
``Records.from_rows`` turns them into columns once. What a run itself does with them needs no
pandas: ``sim.metrics.summarize`` reads the columns with numpy, and ``write_parquet`` hands them to
pyarrow as raw buffers (``pyarrow.Array.from_buffers``: its ``pa.array``/``pa.table`` import pandas
whenever it is installed, ~0.2 s of the ~1 s a tiny ``moesim`` run takes; ``benchmarks/startup.py``).
``frame()`` builds the pandas DataFrame (once) for users and tests: ``RunResult.steps``.

Column types, from the values: Python or numpy ints -> int64; numbers with at least one float (or
None, read as NaN) -> float64; strings -> an object array of str; lists of ints -> a list column
(``list<int64>`` in Parquet). The same types pandas infers from the dicts, so
``frame()`` equals ``pandas.DataFrame(rows, columns=names)``.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np


def _column(name: str, values: list) -> Any:
    """One column's values as an int64 / float64 array, an object array of str, or a list of lists."""
    if values and isinstance(values[0], str):
        if all(isinstance(v, str) for v in values):
            return np.array(values, dtype=object)
    elif values and isinstance(values[0], list):
        return list(values)
    else:
        a = np.array(values)   # numbers: int64 when all are ints, float64 when one is a float
        if a.dtype == object:  # None among numbers: NaN
            a = np.array([np.nan if v is None else v for v in values])
        if a.dtype.kind == "i" or a.dtype.kind == "u":
            return a.astype(np.int64, copy=False)
        if a.dtype.kind == "f":
            return a.astype(np.float64, copy=False)
    raise TypeError(f"record column {name!r} holds values of no supported type (ints, numbers, str, lists of ints)")


class Records:
    """Named columns of equal length (``columns[name]``: an ndarray, or a list of lists)."""

    def __init__(self, names: Sequence[str], columns: dict[str, Any]):
        self.names = list(names)
        self.columns = columns
        self._frame = None

    @classmethod
    def from_rows(cls, rows: Sequence[dict], names: Sequence[str]) -> "Records":
        """Columns ``names`` of ``rows`` (dicts with at least those keys)."""
        return cls(names, {n: _column(n, [r[n] for r in rows]) for n in names})

    def __getitem__(self, name: str):
        return self.columns[name]

    def __contains__(self, name: str) -> bool:
        return name in self.columns

    def __len__(self) -> int:
        return len(self.columns[self.names[0]]) if self.names else 0

    def frame(self):
        """The records as a pandas DataFrame (built on the first call, then the same object)."""
        if self._frame is None:
            import pandas as pd

            self._frame = pd.DataFrame({n: self.columns[n] for n in self.names}, columns=self.names)
        return self._frame

    def write_parquet(self, path) -> None:
        """The records as a Parquet file at ``path`` (pyarrow only; readable by ``pandas.read_parquet``)."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        arrays = [_arrow_array(pa, self.columns[n], len(self)) for n in self.names]
        pq.write_table(pa.Table.from_arrays(arrays, names=self.names), str(path))


def _arrow_array(pa, values, length: int):
    """An Arrow array from a column of ``_column``'s types, built from raw buffers (no pandas)."""
    def buffer(a: np.ndarray):
        return pa.py_buffer(np.ascontiguousarray(a))

    if isinstance(values, np.ndarray) and values.dtype != object:
        kind = pa.int64() if values.dtype == np.int64 else pa.float64()
        return pa.Array.from_buffers(kind, length, [None, buffer(values)])
    if isinstance(values, np.ndarray):   # str
        encoded = [v.encode() for v in values]
        offsets = np.zeros(length + 1, dtype=np.int32)
        np.cumsum([len(b) for b in encoded], out=offsets[1:])
        return pa.Array.from_buffers(pa.string(), length, [None, buffer(offsets), pa.py_buffer(b"".join(encoded))])
    flat = np.array([x for v in values for x in v], dtype=np.int64)
    offsets = np.zeros(length + 1, dtype=np.int32)
    np.cumsum([len(v) for v in values], out=offsets[1:])
    return pa.ListArray.from_arrays(pa.Array.from_buffers(pa.int32(), length + 1, [None, buffer(offsets)]),
                                    pa.Array.from_buffers(pa.int64(), len(flat), [None, buffer(flat)]))
