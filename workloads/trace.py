"""Router traces: the columnar schema, Parquet I/O, validation, and conversion to replayable requests.

Schema (one row per (request, token position, MoE layer); DESIGN.md "Router trace schema"):

================== ================ ==========================================================
column             Parquet type     meaning
================== ================ ==========================================================
request_id         int64            request identifier (unique within the file)
token_index        int64            position within the request, 0-based; prompt positions first
phase              string           ``prefill`` (a prompt position) or ``decode``
layer              int32            ABSOLUTE layer index; must be one of ``moe_layers``
experts            list<int16>      the top-k expert ids the router picked, highest score first
weights            list<float32>    optional: router weights of ``experts`` (same length)
predicted_experts  list<int16>      optional: next MoE layer's experts as predicted at this layer
================== ================ ==========================================================

File-level key-value metadata (UTF-8 strings): ``model`` (name), ``num_experts``, ``top_k``,
``num_layers``, ``moe_layers`` (JSON list of absolute layer indices) and ``source`` (free text:
who or what produced the trace; optional on read).

In memory a trace is a ``pandas.DataFrame`` with these columns; list columns use
``pd.ArrowDtype(list<...>)`` (hand-made frames may also hold Python lists or numpy arrays).

Replay (:func:`load_trace_requests`) turns a trace into :class:`RoutedRequest` objects whose
``experts`` array is ``[T, num_moe_layers, top_k]``: ``T`` token positions, MoE layers in ascending
absolute order. Lengths follow ``workloads.requests``: ``prompt_len`` = number of prefill positions,
``output_len = T - prompt_len + 1`` (the first output token comes out of prefill; the last generated
token is never fed back, so it has no routing). A request with no prefill rows (a decode-only
capture) replays its first recorded position as a one-token prompt: ``prompt_len = 1,
output_len = T``. Ragged or missing records are reported, never invented: see ``on_ragged``.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Literal, Optional

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .io import atomic_write
from .model import ModelSpec
from .validation import ConfigError

REQUIRED_COLUMNS = ("request_id", "token_index", "phase", "layer", "experts")
OPTIONAL_COLUMNS = ("weights", "predicted_experts")
PHASES = ("prefill", "decode")
COLUMN_TYPES: dict[str, pa.DataType] = {
    "request_id": pa.int64(),
    "token_index": pa.int64(),
    "phase": pa.string(),
    "layer": pa.int32(),
    "experts": pa.list_(pa.int16()),
    "weights": pa.list_(pa.float32()),
    "predicted_experts": pa.list_(pa.int16()),
}
META_KEYS = ("model", "num_experts", "top_k", "num_layers", "moe_layers")  # required; "source" optional


class TraceError(ConfigError):
    """A router trace cannot be read or replayed. The message is one line."""


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


# ---------------------------------------------------------------------------------------------
# Metadata


@dataclass(frozen=True)
class TraceMeta:
    """File-level facts of a trace: which model shapes it was recorded for, and by what."""

    model: str
    num_experts: int
    top_k: int
    num_layers: int
    moe_layers: tuple[int, ...]
    source: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "moe_layers", tuple(int(v) for v in self.moe_layers))

    @classmethod
    def for_model(cls, model: ModelSpec, source: str) -> "TraceMeta":
        """Metadata for a trace of ``model`` produced by ``source``."""
        return cls(model=model.name, num_experts=model.num_experts, top_k=model.top_k,
                   num_layers=model.num_layers, moe_layers=tuple(model.moe_layers), source=source)

    def validate(self, where: str = "trace") -> None:
        """Internal consistency of the metadata (TraceError naming the key)."""
        if self.num_experts < 1:
            raise TraceError(f"{where}: metadata num_experts={self.num_experts} is invalid; must be >= 1")
        if not 1 <= self.top_k <= self.num_experts:
            raise TraceError(f"{where}: metadata top_k={self.top_k} is invalid; must be in "
                             f"[1, num_experts={self.num_experts}]")
        if self.num_layers < 1:
            raise TraceError(f"{where}: metadata num_layers={self.num_layers} is invalid; must be >= 1")
        layers = list(self.moe_layers)
        if (not layers or layers != sorted(set(layers))
                or layers[0] < 0 or layers[-1] >= self.num_layers):
            raise TraceError(f"{where}: metadata moe_layers={layers} is invalid; must be a non-empty "
                             f"ascending list of distinct layers in [0, num_layers={self.num_layers})")

    def to_metadata(self) -> dict[bytes, bytes]:
        """Parquet key-value metadata."""
        return {b"model": self.model.encode(), b"num_experts": str(self.num_experts).encode(),
                b"top_k": str(self.top_k).encode(), b"num_layers": str(self.num_layers).encode(),
                b"moe_layers": json.dumps(list(self.moe_layers)).encode(),
                b"source": self.source.encode()}

    @classmethod
    def from_metadata(cls, md: Optional[Mapping[bytes, bytes]], where: str = "trace") -> "TraceMeta":
        """Parse Parquet key-value metadata (TraceError on missing or malformed keys)."""
        md = {k.decode(errors="replace"): v.decode(errors="replace") for k, v in (md or {}).items()}
        missing = [k for k in META_KEYS if k not in md]
        if missing:
            raise TraceError(f"{where} lacks metadata key(s) {', '.join(missing)}; a router trace "
                             f"needs {', '.join(META_KEYS)} (and optionally source)")
        ints = {}
        for key in ("num_experts", "top_k", "num_layers"):
            try:
                ints[key] = int(md[key])
            except ValueError:
                raise TraceError(f"{where}: metadata {key}={md[key]!r} is invalid; expected an integer") from None
        try:
            layers = json.loads(md["moe_layers"])
            if not isinstance(layers, list) or not all(isinstance(v, int) and not isinstance(v, bool)
                                                       for v in layers):
                raise ValueError
        except ValueError:
            raise TraceError(f"{where}: metadata moe_layers={md['moe_layers']!r} is invalid; "
                             f"expected a JSON list of integers") from None
        meta = cls(model=md["model"], moe_layers=tuple(layers), source=md.get("source", ""), **ints)
        meta.validate(where)
        return meta

    def check_model(self, model: ModelSpec, where: str = "trace") -> None:
        """TraceError unless the trace's shapes match ``model`` (the names may differ)."""
        for key in ("num_experts", "top_k", "num_layers", "moe_layers"):
            mine = getattr(self, key)
            theirs = tuple(model.moe_layers) if key == "moe_layers" else getattr(model, key)
            if mine != theirs:
                fmt = (lambda v: list(v)) if key == "moe_layers" else (lambda v: v)
                raise TraceError(
                    f"{where} was recorded for model {self.model!r} with {key}={fmt(mine)}; the "
                    f"scenario's model {model.name} has {key}={fmt(theirs)} (use a trace of this "
                    f"model or set model= to one with the trace's shapes)")


# ---------------------------------------------------------------------------------------------
# Frames and tables


def _list_mapper(tp: pa.DataType):
    if pa.types.is_list(tp) or pa.types.is_large_list(tp) or pa.types.is_fixed_size_list(tp):
        return pd.ArrowDtype(tp)
    return None


def _table_to_frame(table: pa.Table) -> pd.DataFrame:
    return table.to_pandas(types_mapper=_list_mapper)


def _canonical(table: pa.Table, where: str) -> pa.Table:
    """Cast the schema's known columns to their canonical types (TraceError if impossible)."""
    for name, tp in COLUMN_TYPES.items():
        if name not in table.column_names:
            continue
        col = table.column(name)
        if col.type == tp:
            continue
        try:
            if pa.types.is_null(col.type):
                raise pa.ArrowInvalid("the column is all null")
            cast = col.cast(tp)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as exc:
            raise TraceError(f"{where}: column {name} has type {col.type} and cannot be read as "
                             f"{tp} ({_one_line(exc)})") from None
        table = table.set_column(table.column_names.index(name), name, cast)
    return table


def _frame_to_table(df: pd.DataFrame, where: str) -> pa.Table:
    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        raise TraceError(f"{where} lacks column(s) {', '.join(missing)}; a router trace needs "
                         f"{', '.join(REQUIRED_COLUMNS)} (optional: {', '.join(OPTIONAL_COLUMNS)})")
    try:
        table = pa.Table.from_pandas(df, preserve_index=False)
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError) as exc:
        raise TraceError(f"{where}: frame cannot be converted to Arrow ({_one_line(exc)})") from None
    return _canonical(table.replace_schema_metadata(None), where)


def requests_to_frame(requests: Sequence, model: ModelSpec,
                      weights: Optional[Sequence[np.ndarray]] = None) -> pd.DataFrame:
    """A trace frame from ``workloads.requests.Request``-like objects.

    Each request needs ``request_id``, ``prompt_len`` and ``experts`` ``[T, num_moe_layers, top_k]``;
    positions ``token_index < prompt_len`` are ``prefill``, the rest ``decode``. ``weights``
    (optional) holds one ``[T, num_moe_layers, top_k]`` array per request (e.g. from
    ``synthetic.generate_weights``); without it the ``weights`` column is omitted.
    """
    M, K = model.num_moe_layers, model.top_k
    if weights is not None and len(weights) != len(requests):
        raise TraceError(f"weights has {len(weights)} arrays for {len(requests)} requests; "
                         f"expected one per request")
    ids, lengths, prompts, experts, ws = [], [], [], [], []
    for i, req in enumerate(requests):
        ex = np.asarray(req.experts)
        if ex.ndim != 3 or ex.shape[1:] != (M, K):
            raise TraceError(f"request {req.request_id}: experts has shape {list(ex.shape)}; expected "
                             f"[tokens, {M}, {K}] for model {model.name}")
        ids.append(int(req.request_id))
        lengths.append(ex.shape[0])
        prompts.append(int(req.prompt_len))
        experts.append(ex.reshape(-1).astype(np.int16, copy=False))
        if weights is not None:
            w = np.asarray(weights[i])
            if w.shape != ex.shape:
                raise TraceError(f"request {req.request_id}: weights has shape {list(w.shape)}; "
                                 f"expected {list(ex.shape)} like its experts")
            ws.append(w.reshape(-1).astype(np.float32, copy=False))
    if len(set(ids)) != len(ids):
        dup = pd.Series(ids)[pd.Series(ids).duplicated()].iloc[0]
        raise TraceError(f"request_id={dup} occurs twice; request ids must be unique")
    lengths_a = np.asarray(lengths, dtype=np.int64)
    rows_per = lengths_a * M
    n = int(rows_per.sum())
    token = np.concatenate([np.repeat(np.arange(t, dtype=np.int64), M) for t in lengths]) \
        if lengths else np.zeros(0, np.int64)
    prefill = token < np.repeat(np.asarray(prompts, dtype=np.int64), rows_per)
    offsets = pa.array(np.arange(0, n * K + 1, K, dtype=np.int32))
    cols = {
        "request_id": pa.array(np.repeat(np.asarray(ids, dtype=np.int64), rows_per)),
        "token_index": pa.array(token),
        "phase": pa.array(np.array(PHASES, dtype=object)[np.where(prefill, 0, 1)], type=pa.string()),
        "layer": pa.array(np.tile(np.asarray(model.moe_layers, dtype=np.int32), int(lengths_a.sum()))),
        "experts": pa.ListArray.from_arrays(
            offsets, pa.array(np.concatenate(experts) if experts else np.zeros(0, np.int16))),
    }
    if weights is not None:
        cols["weights"] = pa.ListArray.from_arrays(
            offsets, pa.array(np.concatenate(ws) if ws else np.zeros(0, np.float32)))
    preds = [getattr(req, "predicted", None) for req in requests]
    if requests and all(p is not None for p in preds):
        flat = np.concatenate([np.asarray(p, dtype=np.int16).reshape(-1, K) for p in preds])
        keep = flat >= 0  # -1 pads "nothing predicted" (e.g. the last MoE layer)
        pred_offsets = pa.array(np.r_[0, np.cumsum(keep.sum(axis=1))].astype(np.int32))
        cols["predicted_experts"] = pa.ListArray.from_arrays(pred_offsets, pa.array(flat[keep]))
    return _table_to_frame(pa.table(cols))


def write_trace(path, df: pd.DataFrame, meta: TraceMeta) -> None:
    """Write ``df`` as a Parquet router trace with ``meta`` as file metadata.

    Atomic: the file is written to a temporary name in the same directory and renamed over
    ``path``, so readers never see a half-written trace. Contents are not validated (use
    :func:`validate_trace`); column types are cast to the schema's.
    """
    path = Path(path)
    meta.validate(f"trace {path}")
    table = _frame_to_table(df, f"trace {path}").replace_schema_metadata(meta.to_metadata())
    atomic_write(path, lambda tmp: pq.write_table(table, tmp))


def _read_table(path) -> tuple[pa.Table, TraceMeta]:
    path = Path(path)
    where = f"router trace {path}"
    if not path.exists():
        raise TraceError(f"{where} does not exist")
    if not path.is_file():
        raise TraceError(f"{where} is not a file")
    try:
        pf = pq.ParquetFile(path)
        schema = pf.schema_arrow
    except (pa.ArrowException, OSError) as exc:
        raise TraceError(f"{where} is not a readable Parquet file ({_one_line(exc)})") from None
    missing = [c for c in REQUIRED_COLUMNS if c not in schema.names]
    if missing:
        raise TraceError(f"{where} lacks column(s) {', '.join(missing)}; a router trace needs "
                         f"{', '.join(REQUIRED_COLUMNS)} (optional: {', '.join(OPTIONAL_COLUMNS)})")
    meta = TraceMeta.from_metadata(schema.metadata, where)
    try:
        table = pf.read()
    except (pa.ArrowException, OSError) as exc:
        raise TraceError(f"{where} cannot be read ({_one_line(exc)})") from None
    return _canonical(table.replace_schema_metadata(None), where), meta


def read_trace(path) -> tuple[pd.DataFrame, TraceMeta]:
    """Read a Parquet router trace: (frame with the schema's column types, metadata).

    TraceError (one line) if the file is missing, not Parquet, lacks a required column or a
    metadata key, or a column has a type that cannot be read as the schema's.
    """
    table, meta = _read_table(path)
    return _table_to_frame(table), meta


# ---------------------------------------------------------------------------------------------
# Validation


@dataclass
class TraceReport:
    """Every irregularity of a trace, with counts (rows unless the name says otherwise).

    ``expert_out_of_range``: rows with an expert id outside [0, num_experts).
    ``wrong_top_k``: rows whose experts list is null or not of length top_k.
    ``repeated_experts``: rows naming one expert twice.
    ``layer_not_moe``: rows whose layer is not one of the metadata's moe_layers (or out of range).
    ``bad_token_index``: rows with a null or negative token_index (or a null request_id).
    ``duplicate_rows``: extra rows for an already present (request_id, token_index, layer) cell.
    ``missing_rows``: (request, token, layer) cells absent inside a request's token span
    (0 .. max token_index of the request over all its layers).
    ``ragged_requests``: requests with at least one missing cell, i.e. whose layers do not all
    cover the same contiguous positions from 0.
    ``phase_errors``: rows with a phase other than prefill/decode, plus prefill rows at or after
    the request's first decode position (prefill after decode, or a position whose layers
    disagree on the phase).
    ``bad_weights``: rows whose weights list is null, not as long as experts, or has a negative or
    non-finite value (only when the column exists).
    ``bad_predicted``: rows whose predicted_experts names an id outside [0, num_experts).
    """

    rows: int
    requests: int
    expert_out_of_range: int = 0
    wrong_top_k: int = 0
    repeated_experts: int = 0
    layer_not_moe: int = 0
    bad_token_index: int = 0
    duplicate_rows: int = 0
    missing_rows: int = 0
    ragged_requests: int = 0
    phase_errors: int = 0
    bad_weights: int = 0
    bad_predicted: int = 0

    #: irregularities replay cannot work around
    FATAL = ("expert_out_of_range", "wrong_top_k", "repeated_experts", "layer_not_moe",
             "bad_token_index", "duplicate_rows", "phase_errors")
    #: irregularities ``on_ragged=truncate`` handles
    RAGGED = ("missing_rows", "ragged_requests")

    def issues(self) -> dict[str, int]:
        """The non-zero irregularity counts, in field order."""
        return {f.name: getattr(self, f.name) for f in fields(self)
                if f.name not in ("rows", "requests") and getattr(self, f.name)}

    def ok(self) -> bool:
        """True if the trace has no irregularity at all."""
        return not self.issues()

    def summary(self) -> str:
        """One line: size, then the non-zero counts (or 'no irregularities')."""
        issues = self.issues()
        body = ", ".join(f"{k}={v}" for k, v in issues.items()) if issues else "no irregularities"
        return f"{self.rows} rows, {self.requests} requests: {body}"


def _list_parts(col: pa.ChunkedArray, fill: int):
    """(length per row with -1 for null, flat values with nulls filled, parent row of each value)."""
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    lengths = pc.fill_null(pc.list_value_length(arr), -1).to_numpy(zero_copy_only=False)
    flat = arr.flatten()
    values = pc.fill_null(flat, fill).to_numpy(zero_copy_only=False) if flat.null_count else \
        flat.to_numpy(zero_copy_only=False)
    parents = pc.list_parent_indices(arr).to_numpy(zero_copy_only=False)
    return lengths.astype(np.int64), values, parents


def _rows_with(parents: np.ndarray, mask: np.ndarray, n: int) -> np.ndarray:
    flag = np.zeros(n, dtype=bool)
    flag[parents[mask]] = True
    return flag


def _int_column(table: pa.Table, name: str, null: int) -> np.ndarray:
    col = table.column(name)
    if col.null_count:
        col = pc.fill_null(col, null)
    return col.to_numpy().astype(np.int64, copy=False)


@dataclass
class _Analysis:
    report: TraceReport
    req: np.ndarray        # request ordinal per row (first appearance), -1 if null
    request_ids: np.ndarray  # id of each ordinal
    token: np.ndarray
    moe: np.ndarray        # MoE-layer ordinal per row, -1 if not an MoE layer
    decode: np.ndarray     # bool per row
    experts: Optional[np.ndarray]  # [rows, K] when every row has exactly K ids, else None


def _analyse(table: pa.Table, meta: TraceMeta) -> _Analysis:
    n = table.num_rows
    E, K, M = meta.num_experts, meta.top_k, len(meta.moe_layers)
    null_id = np.iinfo(np.int64).min
    rid = _int_column(table, "request_id", null_id)
    codes, uniques = pd.factorize(rid)
    codes = codes.astype(np.int64)
    if (rid == null_id).any():
        codes[rid == null_id] = -1
        keep = uniques != null_id
        remap = np.cumsum(keep) - 1
        codes = np.where(codes >= 0, remap[np.maximum(codes, 0)], -1)
        uniques = uniques[keep]
    R = len(uniques)
    token = _int_column(table, "token_index", -1)
    layer = _int_column(table, "layer", -1)
    lookup = np.full(meta.num_layers, -1, dtype=np.int64)
    lookup[list(meta.moe_layers)] = np.arange(M)
    in_range = (layer >= 0) & (layer < meta.num_layers)
    moe = np.where(in_range, lookup[np.clip(layer, 0, meta.num_layers - 1)], -1)

    rep = TraceReport(rows=n, requests=R)
    rep.layer_not_moe = int(np.count_nonzero(moe < 0))
    bad_tok = (token < 0) | (codes < 0)
    rep.bad_token_index = int(np.count_nonzero(bad_tok))

    # experts
    lengths, values, parents = _list_parts(table.column("experts"), -1)
    rep.wrong_top_k = int(np.count_nonzero(lengths != K))
    rep.expert_out_of_range = int(np.count_nonzero(_rows_with(parents, (values < 0) | (values >= E), n)))
    matrix = None
    if n and (lengths == K).all():
        matrix = values.reshape(n, K)
        srt = np.sort(matrix, axis=1)
        rep.repeated_experts = int(np.count_nonzero((srt[:, 1:] == srt[:, :-1]).any(axis=1)))
    elif values.size:
        order = np.lexsort((values, parents))
        v, p = values[order], parents[order]
        same = (v[1:] == v[:-1]) & (p[1:] == p[:-1])
        rep.repeated_experts = int(np.unique(p[1:][same]).size)

    # cells: duplicates, span, missing
    valid = (moe >= 0) & ~bad_tok
    cells = pd.DataFrame({"r": codes[valid], "t": token[valid], "m": moe[valid]})
    all_keys = pd.DataFrame({"r": codes, "t": token, "l": layer})
    rep.duplicate_rows = int(all_keys.duplicated().sum())
    unique_cells = cells.drop_duplicates()
    span = np.zeros(R, dtype=np.int64)
    if len(cells):
        np.maximum.at(span, cells["r"].to_numpy(), cells["t"].to_numpy() + 1)
    present = np.bincount(unique_cells["r"].to_numpy(), minlength=R) if R else np.zeros(0, np.int64)
    missing = span * M - present
    rep.missing_rows = int(missing.sum())
    rep.ragged_requests = int(np.count_nonzero(missing > 0))

    # phases
    phase = table.column("phase")
    is_prefill = pc.fill_null(pc.equal(phase, "prefill"), False).to_numpy(zero_copy_only=False)
    is_decode = pc.fill_null(pc.equal(phase, "decode"), False).to_numpy(zero_copy_only=False)
    first_decode = np.full(R, np.iinfo(np.int64).max, dtype=np.int64)
    sel = is_decode & ~bad_tok
    if sel.any():
        np.minimum.at(first_decode, codes[sel], token[sel])
    late = is_prefill & ~bad_tok & (token >= first_decode[np.maximum(codes, 0)])
    rep.phase_errors = int(np.count_nonzero(~(is_prefill | is_decode)) + np.count_nonzero(late))

    # optional columns
    if "weights" in table.column_names:
        wl, wv, wp = _list_parts(table.column("weights"), -1)
        bad = (wl != lengths) | (wl < 0) | _rows_with(wp, ~np.isfinite(wv) | (wv < 0), n)
        rep.bad_weights = int(np.count_nonzero(bad))
    if "predicted_experts" in table.column_names:
        _, pv, pp = _list_parts(table.column("predicted_experts"), -1)
        rep.bad_predicted = int(np.count_nonzero(_rows_with(pp, (pv < 0) | (pv >= E), n)))
    return _Analysis(rep, codes, uniques, token, moe, is_decode, matrix)


def validate_trace(df: pd.DataFrame, meta: TraceMeta, model: Optional[ModelSpec] = None,
                   *, where: str = "trace") -> TraceReport:
    """Count every irregularity of trace ``df`` (see :class:`TraceReport`).

    With ``model``, first check that the trace was recorded for the same shapes (num_experts,
    top_k, num_layers, moe_layers): a mismatch raises TraceError naming the field and both values.
    ``where`` names the trace in messages.
    """
    meta.validate(where)
    if model is not None:
        meta.check_model(model, where)
    return _analyse(_frame_to_table(df, where), meta).report


# ---------------------------------------------------------------------------------------------
# Replay


@dataclass
class RoutedRequest:
    """One request of a trace, ready to replay.

    ``experts``: int16 ``[T, num_moe_layers, top_k]``, T = ``prompt_len + output_len - 1`` token
    positions (see the module docstring for how the lengths are derived).
    """

    request_id: int
    prompt_len: int
    output_len: int
    experts: np.ndarray
    predicted: Optional[np.ndarray] = None  # int16 [T, M, K], -1 where nothing was predicted


def _predicted_matrix(table: pa.Table, K: int, E: int) -> Optional[np.ndarray]:
    """``predicted_experts`` as an int16 ``[rows, K]`` matrix padded with -1 (None if absent)."""
    if "predicted_experts" not in table.column_names:
        return None
    n = table.num_rows
    lengths, values, parents = _list_parts(table.column("predicted_experts"), -1)
    out = np.full((n, K), -1, dtype=np.int16)
    if values.size:
        starts = np.r_[0, np.cumsum(np.maximum(lengths, 0))[:-1]]
        rank = np.arange(values.size) - starts[parents]
        ok = (rank < K) & (values >= 0) & (values < E)
        out[parents[ok], rank[ok]] = values[ok]
    return out


def load_trace_requests(path, model: ModelSpec, on_ragged: Literal["error", "truncate"] = "error",
                        limit: Optional[int] = None) -> list[RoutedRequest]:
    """Read, validate and convert a router trace to requests, in order of first appearance.

    ``limit``: keep only the first ``limit`` requests (by first appearance) before validating.
    Hard errors (TraceError): file problems (see :func:`read_trace`), shapes that do not match
    ``model``, an empty trace, and any of ``TraceReport.FATAL``. Missing or ragged records:
    ``on_ragged="error"`` raises TraceError; ``"truncate"`` cuts each request to the longest token
    prefix complete on every MoE layer (routing is never invented), drops requests left with no
    token, and says so with one ``warnings.warn`` line. Bad optional columns (weights,
    predicted_experts) are not used by replay and only produce a warning.
    """
    if on_ragged not in ("error", "truncate"):
        raise TraceError(f"workload.on_ragged={on_ragged!r} is not allowed; choose one of: error, truncate")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, (int, np.integer))
                              or limit < 1):
        raise TraceError(f"workload.num_requests={limit!r} is invalid; must be an integer >= 1 or null")
    table, meta = _read_table(path)
    where = f"router trace {path}"
    meta.check_model(model, where)
    if table.num_rows == 0:
        raise TraceError(f"{where} has no rows; it must hold at least one (request, token, layer) record")
    if limit is not None:
        codes, _ = pd.factorize(table.column("request_id").to_numpy(zero_copy_only=False))
        if codes.max() >= limit:
            table = table.filter(pa.array(codes < limit))
    a = _analyse(table, meta)
    rep = a.report
    fatal = [f"{k}={getattr(rep, k)}" for k in TraceReport.FATAL if getattr(rep, k)]
    if fatal:
        raise TraceError(
            f"{where} cannot be replayed: {', '.join(fatal)} (model {model.name}: expert ids in "
            f"[0, {meta.num_experts}), top_k={meta.top_k} distinct ids per row, layers "
            f"{list(meta.moe_layers)}, one row per (request_id, token_index, layer), prefill "
            f"positions before decode ones)")
    for key in ("bad_weights", "bad_predicted"):
        if getattr(rep, key):
            warnings.warn(f"{where}: {key}={getattr(rep, key)} rows (ignored: replay uses only experts)",
                          stacklevel=2)
    ragged = rep.missing_rows > 0
    if ragged and on_ragged == "error":
        raise TraceError(
            f"{where} has ragged or missing records: missing_rows={rep.missing_rows}, "
            f"ragged_requests={rep.ragged_requests} of {rep.requests}; set workload.on_ragged=truncate "
            f"to replay each request's longest prefix complete on every MoE layer")

    R, M, K = rep.requests, len(meta.moe_layers), meta.top_k
    req, token, moe = a.req, a.token, a.moe
    assert a.experts is not None  # no fatal irregularity: every row has K ids
    if ragged:
        # Longest prefix per (request, layer): the cells are unique, so sorted by token the
        # positions 0..p-1 are exactly the rows whose token equals their rank in the group.
        order = np.lexsort((token, moe, req))
        group = req[order] * M + moe[order]
        starts = np.flatnonzero(np.r_[True, group[1:] != group[:-1]])
        sizes = np.diff(np.r_[starts, len(order)])
        rank = np.arange(len(order)) - np.repeat(starts, sizes)
        hits = group[token[order] == rank]
        prefix = np.bincount(hits, minlength=R * M).reshape(R, M).min(axis=1)
        keep_rows = token < prefix[req]
    else:
        prefix = np.zeros(R, dtype=np.int64)
        np.maximum.at(prefix, req, token + 1)
        keep_rows = np.ones(len(req), dtype=bool)
    rows = np.flatnonzero(keep_rows)
    rows = rows[np.lexsort((moe[rows], token[rows], req[rows]))]
    experts = a.experts[rows].astype(np.int16, copy=False)
    predicted = _predicted_matrix(table, K, meta.num_experts)
    if predicted is not None:
        predicted = predicted[rows]
    prefill_rows = np.bincount(req[rows][~a.decode[rows]], minlength=R)
    bounds = np.r_[0, np.cumsum(prefix * M)]

    out: list[RoutedRequest] = []
    for i in range(R):
        T = int(prefix[i])
        if T == 0:
            continue
        prompt = int(prefill_rows[i]) // M
        if prompt == 0:
            prompt = 1
        ex = experts[bounds[i]:bounds[i + 1]].reshape(T, M, K)
        pred = None if predicted is None else predicted[bounds[i]:bounds[i + 1]].reshape(T, M, K)
        out.append(RoutedRequest(int(a.request_ids[i]), prompt, T - prompt + 1, ex, pred))
    if ragged:
        dropped = R - len(out)
        span = np.zeros(R, dtype=np.int64)
        valid = moe >= 0
        np.maximum.at(span, req[valid], token[valid] + 1)
        cut = int(np.count_nonzero(prefix < span))
        warnings.warn(
            f"{where}: on_ragged=truncate cut {cut} of {R} requests to their longest complete prefix "
            f"({int((span - prefix).sum())} token positions dropped) and dropped {dropped} request(s) "
            f"left with no complete token", stacklevel=2)
    return out
