"""Router-log importers: turn routing logs written by other tools into our Parquet trace schema.

What is read
------------
* **Generic records**: JSON Lines (``.jsonl``/``.ndjson``, or a ``.json`` file holding one object
  per line or a JSON array of objects) and CSV, one record per (request, token, layer). The user
  names the fields (:class:`ImportOptions.fields`, roles ``request token layer experts`` and
  optionally ``weights phase predicted``); a role left unmapped defaults to our schema's column
  name (``request_id token_index layer experts weights phase predicted_experts``), the optional
  ones only when a file has that field. ``experts``/``weights``/``predicted`` are lists in JSON, or
  in CSV cells a JSON list (``"[3, 17]"``) or ids separated by spaces, ``;`` or ``|``.
  A request is identified by the ``request`` field, or by several fields (``group``, plus the
  ``request`` field if it is mapped explicitly); then, or when the ids are not integers, request
  ids ``0..N-1`` are assigned in order of first appearance and the mapping is reported. Shapes
  come from a catalog :class:`ModelSpec` or explicit ``num_experts/top_k/num_layers/dense_layers``
  (a :class:`TraceMeta`).
* **MoELens** per-prompt JSON files (``prompt-N.json``: ``model_id``, ``num_layers``,
  ``num_experts``, ``top_k_experts``, ``dense_layer_indices``, ``tokens`` and
  ``layers[].tokens[].{token_index, top_experts, top_weights}``). Each file is one request (ids
  ``0..N-1`` in file order, natural sort); the trace metadata comes from the file itself and known
  Hugging Face ids map to catalog names (:data:`KNOWN_HF_MODELS`). The prompt's token list gives
  the request's length, so a position missing on every layer still counts as missing. Everything
  else in the file (``all_probs``, JetMoE's ``attention_routing`` of its attention experts, the
  visualiser tensors) is ignored.

A directory source means every file of the format in it (not recursive; ``manifest.json`` and
hidden files are skipped). ``format="auto"`` decides per file: ``.csv`` is CSV, ``.jsonl`` and
``.ndjson`` are JSON Lines, a ``.json`` object with ``layers`` and ``model_id`` is MoELens.

Phase
-----
Routing logs rarely say which positions were prompt positions. Unless a ``phase`` field is mapped
(values ``prefill``/``prompt`` or ``decode``/``generate``, any case) or ``prompt_len_field`` names a
per-request prompt length (positions below it are ``prefill``), every generic row gets
``ImportOptions.phase``, ``decode`` by default: replay then treats a request's first position as a
one-token prompt and the rest as generated tokens (``workloads.trace``). MoELens files are one
forward pass over the prompt, so their rows are ``prefill``.

Messy logs
----------
Nothing is invented: irregular records are dropped or kept as they are, and each kind is counted
in :class:`ImportReport`. In order:

1. ``drop_where`` (``FIELD=VALUE``, any of them) and then ``drop_requests`` (the first N requests,
   e.g. warm-up dummy batches) remove records; counted.
2. Records lacking a request, token or layer value (``incomplete_records``) or with a negative
   token index (``invalid_token_index``) are dropped.
3. The layers present must be exactly the model's MoE layers (``layer_numbering="moe"`` reads the
   logged layer as an ordinal among MoE layers) and every expert id must lie in
   ``[0, num_experts)``: otherwise a hard :class:`TraceError`.
4. Duplicates of a (request, token, layer) cell: exact repeats (same experts) are dropped
   (``duplicate_records``); cells logged with different experts lose every copy
   (``conflicting_duplicate_cells``), as we cannot tell which is right.
5. ``token_index="order"``: a token's index is its order of appearance within (request, layer),
   for loggers that renumber tokens per layer; when a token field is mapped too, the report counts
   the (request, layer) pairs whose logged indices disagreed with the other layers of the request
   (``renumbered_request_layers``, ``renumbered_layers``). Exact duplicates are then recognised by
   the logged index only. Order cannot see a record the logger dropped in the middle of a layer:
   that layer's later tokens move up by one and only the shortfall at the end shows (as missing
   cells); prefer the logged index whenever it is trustworthy.
6. Rows with a null experts list, an expert count other than top_k (``wrong_top_k``) or an expert
   named twice (``repeated_experts``) are dropped; their positions still count towards the
   request's length, so they become missing cells.
7. Missing (request, token, layer) cells inside a request's span (``missing_cells``,
   ``ragged_requests``): ``on_ragged="error"`` refuses, ``"truncate"`` cuts each request to its
   longest token prefix complete on every MoE layer (requests left without a token are dropped),
   ``"keep"`` writes the rows as they are (replay then needs ``workload.on_ragged=truncate``).

Hard errors are one-line :class:`TraceError` s and nothing is written: a missing source, an empty
file, unreadable JSON/CSV (file and line), a field the file lacks (with the fields it has), a value
that is not an integer or list, an expert id out of range, layers that do not match the model,
shapes that contradict the model, phases out of order.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import numpy as np
import pandas as pd
import pyarrow as pa

from .model import ModelSpec
from .trace import COLUMN_TYPES, TraceError, TraceMeta, validate_trace, write_trace
from .validation import ConfigError

FORMATS = ("auto", "jsonl", "csv", "moelens")
ROLES = ("request", "token", "layer", "experts", "weights", "phase", "predicted")
#: a role's field name when the user does not map it (our schema's column names)
DEFAULT_FIELDS = {"request": "request_id", "token": "token_index", "layer": "layer",
                  "experts": "experts", "weights": "weights", "phase": "phase",
                  "predicted": "predicted_experts"}
OPTIONAL_ROLES = ("weights", "phase", "predicted")
#: Hugging Face ids of models in our catalog (``conf/model``); callers may pass more
KNOWN_HF_MODELS = {
    "deepseek-ai/deepseek-moe-16b-base": "deepseek_moe_16b",
    "jetmoe/jetmoe-8b": "jetmoe_8b",
}
PHASE_ALIASES = {"prefill": "prefill", "prompt": "prefill", "context": "prefill",
                 "decode": "decode", "generate": "decode", "generation": "decode", "gen": "decode"}

_JSONL_EXT = (".jsonl", ".ndjson")
_DIR_EXT = {"auto": (".json", ".jsonl", ".ndjson", ".csv"), "jsonl": (".json", ".jsonl", ".ndjson"),
            "csv": (".csv",), "moelens": (".json",)}
_MOELENS_KEYS = ("model_id", "num_layers", "num_experts", "top_k_experts", "layers")

#: every irregularity the report counts, with what it means (printed next to non-zero counts)
IRREGULARITIES = {
    "dropped_where_records": "records matching --drop-where, dropped",
    "dropped_warmup_requests": "first requests dropped by --drop-requests (warm-up)",
    "dropped_warmup_records": "records of those requests",
    "incomplete_records": "records lacking a request, token, layer, experts or phase value, dropped",
    "invalid_token_index": "records with a negative token index, dropped",
    "duplicate_records": "exact repeats of a (request, token, layer) record, dropped",
    "conflicting_duplicate_cells": "(request, token, layer) cells logged twice with different experts: "
                                   "every copy dropped",
    "conflicting_duplicate_records": "records in those cells",
    "renumbered_request_layers": "(request, layer) pairs whose logged token indices disagreed with the "
                                 "request's other layers (indices taken from order of appearance)",
    "renumbered_layers": "distinct layers among them",
    "wrong_top_k": "rows whose expert count is not top_k, dropped",
    "repeated_experts": "rows naming one expert twice, dropped",
    "missing_cells": "(request, token, layer) cells absent inside a request's token span "
                     "(records the logger dropped, or dropped above)",
    "ragged_requests": "requests with at least one missing cell",
    "truncated_requests": "requests cut to their longest prefix complete on every MoE layer",
    "truncated_positions": "token positions cut by truncation",
    "truncated_rows": "rows cut by truncation",
    "emptied_requests": "requests left without a complete token position, dropped",
    "bad_weights": "rows whose weights are null, not as long as experts, or negative (kept; "
                   "replay ignores weights)",
    "bad_predicted": "rows whose predicted experts name an id out of range (kept; replay ignores them)",
}


# ---------------------------------------------------------------------------------------------
# Options and report


@dataclass(frozen=True)
class ImportOptions:
    """How to read the sources (see the module docstring)."""

    format: Literal["auto", "jsonl", "csv", "moelens"] = "auto"
    fields: Mapping[str, str] = field(default_factory=dict)  # role -> source field name
    group: tuple[str, ...] = ()
    token_index: Literal["field", "order"] = "field"
    layer_numbering: Literal["absolute", "moe"] = "absolute"
    drop_requests: int = 0
    drop_where: tuple[tuple[str, str], ...] = ()
    layer_from_filename: Optional[str] = None
    phase: Literal["decode", "prefill"] = "decode"
    prompt_len_field: Optional[str] = None
    on_ragged: Literal["error", "truncate", "keep"] = "error"

    def validate(self) -> None:
        choices = {"format": FORMATS, "token_index": ("field", "order"),
                   "layer_numbering": ("absolute", "moe"), "phase": ("decode", "prefill"),
                   "on_ragged": ("error", "truncate", "keep")}
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ConfigError(f"{key}={getattr(self, key)!r} is not allowed; choose one of: "
                                  f"{', '.join(allowed)}")
        unknown = [r for r in self.fields if r not in ROLES]
        if unknown:
            raise ConfigError(f"--fields {unknown[0]}=... is not a known role; roles: {', '.join(ROLES)}")
        for role, name in self.fields.items():
            if not isinstance(name, str) or not name:
                raise ConfigError(f"--fields {role}={name!r} is invalid; give a field name")
        if isinstance(self.drop_requests, bool) or not isinstance(self.drop_requests, int) \
                or self.drop_requests < 0:
            raise ConfigError(f"--drop-requests={self.drop_requests!r} is invalid; must be an integer >= 0")
        if self.layer_from_filename is not None:
            if "layer" in self.fields:
                raise ConfigError("--layer-from-filename and --fields layer=... are alternatives; give one")
            try:
                groups = re.compile(self.layer_from_filename).groups
            except re.error as exc:
                raise ConfigError(f"--layer-from-filename={self.layer_from_filename!r} is not a valid "
                                  f"regular expression ({exc})") from None
            if groups != 1:
                raise ConfigError(f"--layer-from-filename={self.layer_from_filename!r} has {groups} "
                                  f"capture groups; it needs exactly one, around the layer number")
        if self.prompt_len_field is not None and "phase" in self.fields:
            raise ConfigError("--prompt-len-field and --fields phase=... are alternatives; give one")
        if len(set(self.group)) != len(self.group) or not all(self.group):
            raise ConfigError(f"--group={','.join(self.group)!r} is invalid; give distinct field names")


@dataclass
class ImportReport:
    """What an import read, wrote and every irregularity it met, with counts."""

    dest: str
    sources: list[str]
    files: int
    format: str
    model: str
    num_experts: int
    top_k: int
    num_layers: int
    moe_layers: list[int]
    records_read: int = 0
    requests: int = 0
    tokens: int = 0
    prefill_tokens: int = 0
    decode_tokens: int = 0
    rows: int = 0
    layers: int = 0
    on_ragged: str = "error"
    irregularities: dict[str, int] = field(default_factory=lambda: {k: 0 for k in IRREGULARITIES})
    notes: list[str] = field(default_factory=list)
    #: request id -> what identified it in the source (when ids were assigned)
    request_ids: dict[int, Any] = field(default_factory=dict)

    def issues(self) -> dict[str, int]:
        """The non-zero irregularity counts."""
        return {k: v for k, v in self.irregularities.items() if v}

    def lines(self) -> list[str]:
        """The human-readable report."""
        out = [f"moesim-trace import: wrote {self.dest}",
               f"  sources: {self.files} file(s), format {self.format}: {' '.join(self.sources)}",
               f"  model: {self.model} ({self.num_experts} experts, top-{self.top_k}, {self.num_layers} "
               f"layers, {len(self.moe_layers)} MoE layers)",
               f"  records read: {self.records_read}",
               f"  requests: {self.requests}  tokens: {self.tokens} ({self.prefill_tokens} prefill, "
               f"{self.decode_tokens} decode)  rows: {self.rows}  layers: {self.layers}"]
        issues = self.issues()
        if not issues:
            out.append("  irregularities: none")
        else:
            out.append("  irregularities:")
            out += [f"    {k}: {v}  ({IRREGULARITIES[k]})" for k, v in issues.items()]
        out += [f"  note: {n}" for n in self.notes]
        return out

    def to_dict(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in ("dest", "sources", "files", "format", "model", "num_experts",
                                           "top_k", "num_layers", "moe_layers", "records_read",
                                           "requests", "tokens", "prefill_tokens", "decode_tokens",
                                           "rows", "layers", "on_ragged", "irregularities", "notes")}
        d["request_ids"] = {str(k): v for k, v in self.request_ids.items()}
        return d

    def write_json(self, path) -> None:
        """Write :meth:`to_dict` as JSON, atomically."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "w") as fh:
                json.dump(self.to_dict(), fh, indent=2, default=str)
                fh.write("\n")
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise


# ---------------------------------------------------------------------------------------------
# Small parsers


def parse_fields(text: str) -> dict[str, str]:
    """``"request=problem_id,token=token_idx"`` -> ``{"request": "problem_id", "token": "token_idx"}``."""
    out: dict[str, str] = {}
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        role, sep, name = part.partition("=")
        role, name = role.strip(), name.strip()
        if not sep or not role or not name:
            raise ConfigError(f"--fields item {part!r} is invalid; write ROLE=FIELD, e.g. request=problem_id")
        if role not in ROLES:
            raise ConfigError(f"--fields {role}={name} is not a known role; roles: {', '.join(ROLES)}")
        if role in out:
            raise ConfigError(f"--fields maps {role} twice ({out[role]}, {name}); map it once")
        out[role] = name
    return out


def parse_drop_where(items: Sequence[str]) -> tuple[tuple[str, str], ...]:
    out = []
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise ConfigError(f"--drop-where {item!r} is invalid; write FIELD=VALUE")
        out.append((name.strip(), value.strip()))
    return tuple(out)


def _natural_key(path: Path):
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", path.name)]


def _is_null(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v)) or (isinstance(v, str) and not v.strip())


def _norm_value(v: Any) -> str:
    """A cell as text for --drop-where comparisons (``5``, ``5.0`` and ``"5"`` are equal)."""
    if _is_null(v):
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    if isinstance(v, (list, dict)):
        return json.dumps(v)
    s = str(v).strip()
    try:
        f = float(s)
        if f.is_integer() and re.fullmatch(r"[+-]?\d+(\.0*)?", s):
            return str(int(f))
    except ValueError:
        pass
    return s


_INT_RE = re.compile(r"[+-]?\d+")


def _as_int(v: Any) -> Optional[int]:
    """An integer cell, None for null; ValueError for anything else."""
    if type(v) is int:
        return v
    if _is_null(v):
        return None
    if isinstance(v, bool):
        raise ValueError
    if isinstance(v, (int, np.integer)):
        return int(v)
    if isinstance(v, (float, np.floating)):
        if float(v).is_integer():
            return int(v)
        raise ValueError
    if isinstance(v, str):
        s = v.strip()
        if _INT_RE.fullmatch(s):
            return int(s)
        try:
            f = float(s)
        except ValueError:
            raise ValueError from None
        if f.is_integer():
            return int(f)
    raise ValueError


def _as_list(v: Any, integer: bool) -> Optional[list]:
    """A list cell (JSON list, list object, separated text, or one number), None for null."""
    if type(v) is list:  # the common case: a JSON list of plain ints / floats
        if integer:
            if all(type(x) is int for x in v):
                return v
        elif all(type(x) is float or type(x) is int for x in v):
            return [float(x) for x in v]
    if _is_null(v):
        return None
    if isinstance(v, str):
        s = v.strip()
        if s.startswith("["):
            v = json.loads(s)  # JSONDecodeError is a ValueError
        else:
            v = [p for p in re.split(r"[\s,;|]+", s) if p]
    elif isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool):
        v = [v]
    elif isinstance(v, np.ndarray):
        v = v.tolist()
    if not isinstance(v, (list, tuple)):
        raise ValueError
    if integer:
        out = [_as_int(x) for x in v]
        if any(x is None for x in out):
            raise ValueError
        return out
    vals = []
    for x in v:
        if isinstance(x, bool) or _is_null(x):
            raise ValueError
        vals.append(float(x))
    return vals


def _compact(values) -> str:
    """``[1, 2, 3, 5]`` -> ``"1-3,5"``."""
    vals = sorted(set(int(v) for v in values))
    parts, i = [], 0
    while i < len(vals):
        j = i
        while j + 1 < len(vals) and vals[j + 1] == vals[j] + 1:
            j += 1
        parts.append(str(vals[i]) if i == j else f"{vals[i]}-{vals[j]}")
        i = j + 1
    return ",".join(parts) if parts else "none"


# ---------------------------------------------------------------------------------------------
# Sources


def discover(sources: Sequence, fmt: str = "auto") -> list[Path]:
    """The files the sources name: files as given, directories expanded (natural order)."""
    if not sources:
        raise TraceError("no source given; name at least one router-log file or directory")
    files: list[Path] = []
    for src in sources:
        p = Path(src)
        if p.is_dir():
            exts = _DIR_EXT[fmt]
            found = sorted((c for c in p.iterdir() if c.is_file() and not c.name.startswith(".")
                            and c.name != "manifest.json" and c.suffix.lower() in exts), key=_natural_key)
            if not found:
                raise TraceError(f"{p} holds no router-log files (looked for {', '.join('*' + e for e in exts)};"
                                 f" manifest.json is not a trace)")
            files += found
        elif p.is_file():
            files.append(p)
        elif not p.exists():
            raise TraceError(f"source {p} does not exist")
        else:
            raise TraceError(f"source {p} is neither a file nor a directory")
    seen: set = set()
    for f in files:
        key = f.resolve()
        if key in seen:
            raise TraceError(f"{f} is named twice among the sources; name each file once")
        seen.add(key)
    return files


def _read_text(path: Path) -> str:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise TraceError(f"{path} cannot be read ({exc.strerror or exc})") from None
    if not data.strip():
        raise TraceError(f"{path} is empty; it holds no routing records")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise TraceError(f"{path}:{line}: not UTF-8 text ({exc.reason})") from None


def _json_error(path: Path, exc: json.JSONDecodeError) -> TraceError:
    return TraceError(f"{path}:{exc.lineno}: unreadable JSON ({exc.msg}, column {exc.colno})")


@dataclass
class _File:
    path: Path
    kind: str                      # jsonl | records | csv | moelens
    frame: Optional[pd.DataFrame] = None   # generic: raw records (+ _line)
    fields: tuple[str, ...] = ()           # generic: field names the file has
    doc: Optional[dict] = None             # moelens


def _load_jsonl(path: Path, text: str) -> _File:
    numbered = [(i, s) for i, s in enumerate(text.split("\n"), 1) if s.strip()]
    records = None
    try:  # one decode of the whole file is about twice as fast as one per line
        records = json.loads("[" + ",".join(s for _, s in numbered) + "]")
        if len(records) != len(numbered):
            records = None
    except json.JSONDecodeError:
        pass
    if records is None:  # find the bad line
        records = []
        for i, s in numbered:
            try:
                records.append(json.loads(s))
            except json.JSONDecodeError as exc:
                raise TraceError(f"{path}:{i}: unreadable JSON ({exc.msg}, column {exc.colno})") from None
    for (i, _), obj in zip(numbered, records):
        if not isinstance(obj, dict):
            raise TraceError(f"{path}:{i}: a JSON Lines record must be an object, not {type(obj).__name__}")
    return _records_file(path, "jsonl", records, [i for i, _ in numbered])


def _records_file(path: Path, kind: str, records: list, lines: list) -> _File:
    if not records:
        raise TraceError(f"{path} is empty; it holds no routing records")
    names: dict[str, None] = {}
    for r in records:
        for k in r:
            names.setdefault(k, None)
    frame = pd.DataFrame.from_records(records, columns=list(names))
    frame["_line"] = np.asarray(lines, dtype=np.int64)
    return _File(path, kind, frame=frame, fields=tuple(names))


def _load_csv(path: Path) -> _File:
    _read_text(path)  # empty / not UTF-8
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False, skipinitialspace=True,
                            encoding="utf-8-sig")
    except pd.errors.EmptyDataError:
        raise TraceError(f"{path} is empty; it holds no routing records") from None
    except (pd.errors.ParserError, ValueError) as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TraceError(f"{path}: unreadable CSV ({msg})") from None
    if frame.empty:
        raise TraceError(f"{path} is empty; it has a header but no routing records")
    fields_ = tuple(str(c) for c in frame.columns)
    frame = frame.where(frame != "", None)
    frame["_line"] = np.arange(2, len(frame) + 2, dtype=np.int64)  # line 1 is the header
    return _File(path, "csv", frame=frame, fields=fields_)


def _load(path: Path, fmt: str) -> _File:
    suffix = path.suffix.lower()
    if fmt == "csv" or (fmt == "auto" and suffix == ".csv"):
        return _load_csv(path)
    text = _read_text(path)
    if fmt == "jsonl" and suffix in _JSONL_EXT:
        return _load_jsonl(path, text)
    if fmt == "auto" and suffix not in (".json", *_JSONL_EXT):
        if not text.lstrip().startswith(("{", "[")):
            return _load_csv(path)
    if fmt in ("auto", "jsonl", "moelens") and suffix not in _JSONL_EXT:
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as exc:
            if exc.msg == "Extra data" and fmt != "moelens":
                return _load_jsonl(path, text)  # one object per line
            raise _json_error(path, exc) from None
        if isinstance(doc, dict) and (fmt == "moelens" or ("layers" in doc and "model_id" in doc)):
            return _File(path, "moelens", doc=doc)
        if fmt == "moelens":
            raise TraceError(f"{path} is not a MoELens routing trace: expected a JSON object with "
                             f"{', '.join(_MOELENS_KEYS)}")
        if isinstance(doc, list):
            bad = next((i for i, r in enumerate(doc) if not isinstance(r, dict)), None)
            if bad is not None:
                raise TraceError(f"{path}: record {bad + 1} of the JSON array is not an object")
            return _records_file(path, "records", doc, list(range(1, len(doc) + 1)))
        if isinstance(doc, dict):
            return _records_file(path, "jsonl", [doc], [1])
        raise TraceError(f"{path}: expected JSON objects, got {type(doc).__name__}")
    return _load_jsonl(path, text)


# ---------------------------------------------------------------------------------------------
# Rows: the common form every reader produces


@dataclass
class _Rows:
    """Records in order of appearance, one entry per record (numpy/object arrays)."""

    file: np.ndarray        # int: index into the file list
    line: np.ndarray        # int: line (record number) in the file, for messages
    req: np.ndarray         # int: request ordinal (first appearance), -1 = null
    tok: np.ndarray         # float: logged token index (nan = null / not logged)
    layer: np.ndarray       # float: layer (nan = null)
    experts: np.ndarray     # object: list[int] | None
    weights: Optional[np.ndarray] = None
    predicted: Optional[np.ndarray] = None
    phase: Optional[np.ndarray] = None   # object: "prefill" | "decode" | None
    plen: Optional[np.ndarray] = None    # float: prompt length (nan = null)

    def __len__(self) -> int:
        return len(self.file)

    def take(self, idx) -> "_Rows":
        out = {}
        for name in self.__dataclass_fields__:
            v = getattr(self, name)
            out[name] = None if v is None else v[idx]
        return _Rows(**out)


def _obj(values: list) -> np.ndarray:
    arr = np.empty(len(values), dtype=object)
    arr[:] = values
    return arr


class _Ctx:
    """State shared by the import steps: files, counts, notes, messages."""

    def __init__(self, files: list[Path], kind: str):
        self.files = files
        self.kind = kind
        self.counts = {k: 0 for k in IRREGULARITIES}
        self.notes: list[str] = []
        self.records_read = 0

    def where(self, rows: _Rows, i: int) -> str:
        path = self.files[int(rows.file[i])]
        if self.kind == "moelens":
            tok = "" if np.isnan(rows.tok[i]) else f", token_index {int(rows.tok[i])}"
            lay = "" if np.isnan(rows.layer[i]) else f"layer {int(rows.layer[i])}"
            return f"{path} ({lay}{tok})"
        return f"{path}:{int(rows.line[i])}"


def _convert(values: np.ndarray, conv, role: str, rows_where) -> list:
    out = []
    for i, v in enumerate(values):
        try:
            out.append(conv(v))
        except (ValueError, TypeError, OverflowError):
            text = v if isinstance(v, str) else json.dumps(v, default=str)
            if len(text) > 60:
                text = text[:57] + "..."
            kind = {"token": "an integer", "layer": "an integer", "request": "an integer",
                    "experts": "a list of integers", "predicted": "a list of integers",
                    "weights": "a list of numbers", "prompt_len": "an integer",
                    "phase": "prefill or decode (or prompt/generate; drop other records with "
                             "--drop-where FIELD=VALUE)"}.get(role, "valid")
            raise TraceError(f"{rows_where(i)}: {role} value {text} is not {kind}") from None
    return out


def _floats(ints: list) -> np.ndarray:
    return np.array([np.nan if v is None else v for v in ints], dtype=np.float64)


# ---------------------------------------------------------------------------------------------
# Generic records -> rows


def _resolve_fields(files: list[_File], opts: ImportOptions) -> dict[str, Optional[str]]:
    """role -> source field (None = not used); checks every needed field exists in every file.

    A mapped role and the core roles must exist in every file; an unmapped optional role uses our
    column name when every file has it.
    """
    have_all = set.intersection(*(set(f.fields) for f in files))
    roles: dict[str, Optional[str]] = {}
    required: dict[str, str] = {}  # field -> what needs it
    for role in ROLES:
        default = DEFAULT_FIELDS[role]
        if role in opts.fields:
            roles[role] = opts.fields[role]
            required[opts.fields[role]] = f"--fields {role}={opts.fields[role]}"
        elif (role == "layer" and opts.layer_from_filename) or (role == "request" and opts.group):
            roles[role] = None
        elif role in OPTIONAL_ROLES or (role == "token" and opts.token_index == "order"):
            roles[role] = default if default in have_all else None
        else:
            roles[role] = default
            required.setdefault(default, f"the {role} role (name another field with --fields {role}=FIELD)")
    if opts.prompt_len_field:
        roles["phase"] = None
        required.setdefault(opts.prompt_len_field, f"--prompt-len-field {opts.prompt_len_field}")
    for g in opts.group:
        required.setdefault(g, f"--group {','.join(opts.group)}")
    for name, _ in opts.drop_where:
        required.setdefault(name, f"--drop-where {name}=...")
    for f in files:
        for name, why in required.items():
            if name not in f.fields:
                raise TraceError(f"{f.path} has no field {name!r} (needed for {why}); its fields: "
                                 f"{', '.join(map(str, f.fields))}")
    return roles


def _generic_rows(files: list[_File], opts: ImportOptions, ctx: _Ctx) -> tuple[_Rows, list, bool, str]:
    roles = _resolve_fields(files, opts)
    frames = []
    for i, f in enumerate(files):
        fr = f.frame.copy()
        fr["_file"] = i
        frames.append(fr)
    raw = pd.concat(frames, ignore_index=True, sort=False) if len(frames) > 1 else frames[0]
    n_read = len(raw)
    file_a = raw["_file"].to_numpy(np.int64)
    line_a = raw["_line"].to_numpy(np.int64)

    def where_raw(idx):
        return lambda i: f"{files[int(file_a[idx[i]])].path}:{int(line_a[idx[i]])}"

    def col(name: str) -> np.ndarray:
        return raw[name].to_numpy(dtype=object) if name in raw.columns else _obj([None] * len(raw))

    keep = np.ones(n_read, dtype=bool)
    # 1. --drop-where
    for name, value in opts.drop_where:
        target = _norm_value(value)
        hit = np.fromiter((_norm_value(v) == target for v in col(name)), dtype=bool, count=n_read)
        ctx.counts["dropped_where_records"] += int(np.count_nonzero(hit & keep))
        keep &= ~hit
    # request key
    key_fields = list(opts.group)
    if roles["request"] is not None and roles["request"] not in key_fields:
        key_fields.append(roles["request"])
    key_cols = [col(k) for k in key_fields]
    key_null = np.zeros(n_read, dtype=bool)
    for c in key_cols:
        key_null |= np.fromiter((_is_null(v) for v in c), dtype=bool, count=n_read)
    ctx.counts["incomplete_records"] += int(np.count_nonzero(key_null & keep))
    keep &= ~key_null
    idx = np.flatnonzero(keep)

    def key_of(v):
        if isinstance(v, (bool, np.bool_)):
            return bool(v)
        if isinstance(v, np.integer):
            return int(v)
        if isinstance(v, (float, np.floating)) and float(v).is_integer():
            return int(v)
        if isinstance(v, (list, dict)):
            return json.dumps(v, sort_keys=True)
        return v
    if len(key_cols) == 1:
        keys = [key_of(v) for v in key_cols[0][idx]]
    else:
        keys = [tuple(key_of(c[i]) for c in key_cols) for i in idx]
    ordinal: dict = {}
    req = np.fromiter((ordinal.setdefault(k, len(ordinal)) for k in keys), dtype=np.int64, count=len(keys))
    labels = list(ordinal)
    # 2. --drop-requests: the first N requests by first appearance
    if opts.drop_requests:
        n_drop = min(opts.drop_requests, len(labels))
        gone = req < n_drop
        ctx.counts["dropped_warmup_requests"] = n_drop
        ctx.counts["dropped_warmup_records"] = int(np.count_nonzero(gone))
        idx, req = idx[~gone], req[~gone] - n_drop
        labels = labels[n_drop:]
    if len(idx) == 0:
        raise TraceError(f"no records left after dropping: {n_read} read, "
                         f"{ctx.counts['dropped_where_records']} matched --drop-where, "
                         f"{ctx.counts['dropped_warmup_records']} belonged to the first "
                         f"{ctx.counts['dropped_warmup_requests']} requests, "
                         f"{ctx.counts['incomplete_records']} had no request value")

    w = where_raw(idx)
    tok = _floats(_convert(col(roles["token"])[idx], _as_int, "token", w)) if roles["token"] \
        else np.full(len(idx), np.nan)
    if roles["layer"] is not None:
        layer = _floats(_convert(col(roles["layer"])[idx], _as_int, "layer", w))
    else:
        layer = _layers_from_filenames(files, opts.layer_from_filename)[file_a[idx]].astype(np.float64)
    experts = _obj(_convert(col(roles["experts"])[idx], lambda v: _as_list(v, True), "experts", w))
    weights = _obj(_convert(col(roles["weights"])[idx], lambda v: _as_list(v, False), "weights", w)) \
        if roles["weights"] else None
    predicted = _obj(_convert(col(roles["predicted"])[idx], lambda v: _as_list(v, True), "predicted", w)) \
        if roles["predicted"] else None
    phase = None
    if roles["phase"]:
        phase = _obj(_convert(col(roles["phase"])[idx], _as_phase, "phase", w))
    plen = None
    if opts.prompt_len_field:
        plen = _floats(_convert(col(opts.prompt_len_field)[idx], _as_int, "prompt_len", w))
    rows = _Rows(file=file_a[idx], line=line_a[idx], req=req, tok=tok, layer=layer, experts=experts,
                 weights=weights, predicted=predicted, phase=phase, plen=plen)
    ctx.records_read = n_read
    int_ids = len(key_fields) == 1 and _all_int(labels)
    label_desc = ", ".join(key_fields)
    return rows, labels, int_ids, label_desc


def _all_int(labels: list) -> bool:
    try:
        vals = [_as_int(v) for v in labels]
    except ValueError:
        return False
    return all(v is not None for v in vals) and len(set(vals)) == len(vals)


def _as_phase(v: Any) -> Optional[str]:
    if _is_null(v):
        return None
    s = str(v).strip().lower()
    if s in PHASE_ALIASES:
        return PHASE_ALIASES[s]
    raise ValueError


def _layers_from_filenames(files: list[_File], pattern: str) -> np.ndarray:
    rx = re.compile(pattern)
    out = []
    for f in files:
        m = rx.search(f.path.name) or rx.search(str(f.path))
        if m is None:
            raise TraceError(f"{f.path}: --layer-from-filename {pattern!r} does not match the file name")
        try:
            value = _as_int(m.group(1))
            if value is None:
                raise ValueError
        except ValueError:
            raise TraceError(f"{f.path}: --layer-from-filename {pattern!r} captured {m.group(1)!r}, "
                             f"not a layer number") from None
        out.append(value)
    return np.asarray(out, dtype=np.int64)


# ---------------------------------------------------------------------------------------------
# MoELens -> rows


def _moelens_meta(f: _File) -> dict:
    doc = f.doc
    missing = [k for k in _MOELENS_KEYS if k not in doc]
    if missing:
        raise TraceError(f"{f.path} is not a MoELens routing trace: it lacks {', '.join(missing)}; "
                         f"its keys: {', '.join(map(str, doc))}")
    out = {"model_id": str(doc["model_id"])}
    for key in ("num_layers", "num_experts", "top_k_experts"):
        try:
            out[key] = _as_int(doc[key])
            if out[key] is None:
                raise ValueError
        except ValueError:
            raise TraceError(f"{f.path}: {key}={doc[key]!r} is not an integer") from None
    dense = set()
    try:
        dense |= {_as_int(v) for v in (doc.get("dense_layer_indices") or [])}
        layers = doc["layers"]
        if not isinstance(layers, list):
            raise ValueError
        for entry in layers:
            if not isinstance(entry, dict) or "layer" not in entry:
                raise ValueError
            if entry.get("is_dense"):
                dense.add(_as_int(entry["layer"]))
    except (ValueError, TypeError):
        raise TraceError(f"{f.path}: layers/dense_layer_indices are not in MoELens form (a list of "
                         f"{{layer, tokens}} objects and a list of layer numbers)") from None
    out["dense"] = tuple(sorted(d for d in dense if d is not None))
    return out


def _moelens_rows(files: list[_File], ctx: _Ctx, drop_requests: int) -> tuple[_Rows, dict, np.ndarray]:
    metas = [_moelens_meta(f) for f in files]
    first = metas[0]
    for f, m in zip(files, metas):
        if m != first:
            diff = next(k for k in first if first[k] != m[k])
            raise TraceError(f"{f.path} has {diff}={m[diff]!r} but {files[0].path} has {first[diff]!r}; "
                             f"import one model's traces at a time")
    if drop_requests:
        n_drop = min(drop_requests, len(files))
        ctx.counts["dropped_warmup_requests"] = n_drop
        ctx.counts["dropped_warmup_records"] = sum(
            sum(len(e.get("tokens") or []) for e in f.doc["layers"]) for f in files[:n_drop])
        if n_drop == len(files):
            raise TraceError(f"--drop-requests={drop_requests} drops all {len(files)} MoELens prompts")
    cols: dict[str, list] = {k: [] for k in ("file", "req", "tok", "layer", "experts", "weights")}
    spans = []
    start = ctx.counts["dropped_warmup_requests"]
    for r, (i, f) in enumerate(list(enumerate(files))[start:]):
        spans.append(len(f.doc.get("tokens") or []))
        for entry in f.doc["layers"]:
            toks = entry.get("tokens")
            if not toks:
                continue
            if not isinstance(toks, list):
                raise TraceError(f"{f.path}: layer {entry['layer']} tokens is not a list")
            n = len(toks)
            cols["file"] += [i] * n
            cols["req"] += [r] * n
            cols["layer"] += [entry["layer"]] * n
            for t in toks:
                if not isinstance(t, dict):
                    raise TraceError(f"{f.path}: layer {entry['layer']} holds a token entry that is not an object")
                cols["tok"].append(t.get("token_index"))
                cols["experts"].append(t.get("top_experts"))
                cols["weights"].append(t.get("top_weights"))
    n = len(cols["file"])
    ctx.records_read = n + ctx.counts["dropped_warmup_records"]
    if n == 0:
        raise TraceError(f"{files[0].path}: no layer holds routing records (every layer's tokens is null)")
    file_a = np.asarray(cols["file"], dtype=np.int64)
    rows = _Rows(file=file_a, line=np.zeros(n, dtype=np.int64), req=np.asarray(cols["req"], dtype=np.int64),
                 tok=np.full(n, np.nan), layer=np.full(n, np.nan), experts=_obj([None] * n))
    rows.layer = _floats(_convert(_obj(cols["layer"]), _as_int, "layer", lambda i: ctx.where(rows, i)))
    rows.tok = _floats(_convert(_obj(cols["tok"]), _as_int, "token", lambda i: ctx.where(rows, i)))
    rows.experts = _obj(_convert(_obj(cols["experts"]), lambda v: _as_list(v, True), "experts",
                                 lambda i: ctx.where(rows, i)))
    rows.weights = _obj(_convert(_obj(cols["weights"]), lambda v: _as_list(v, False), "weights",
                                 lambda i: ctx.where(rows, i)))
    rows.phase = _obj(["prefill"] * n)
    routed = set(rows.layer[~np.isnan(rows.layer)].astype(int).tolist())
    bad_dense = sorted(routed & set(first["dense"]))
    if bad_dense:
        raise TraceError(f"{files[0].path}: layer(s) {_compact(bad_dense)} are listed as dense but hold routing")
    if "attention_routing" in files[0].doc:
        ctx.notes.append("attention_routing (the routing of mixture-of-attention experts) is not part of "
                         "our schema and was ignored")
    return rows, first, np.asarray(spans, dtype=np.int64)


# ---------------------------------------------------------------------------------------------
# The common steps


def _check_layers(rows: _Rows, meta: TraceMeta, opts: ImportOptions, ctx: _Ctx) -> np.ndarray:
    """Absolute layer per row (int); TraceError unless the layers are exactly the MoE layers."""
    layer = rows.layer.astype(np.int64)
    M = len(meta.moe_layers)
    moe = np.asarray(meta.moe_layers, dtype=np.int64)
    if opts.layer_numbering == "moe":
        bad = (layer < 0) | (layer >= M)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise TraceError(f"{ctx.where(rows, i)}: layer {layer[i]} is not an MoE-layer ordinal of model "
                             f"{meta.model} (--layer-numbering moe: 0..{M - 1})")
        layer = moe[layer]
    seen = set(np.unique(layer).tolist())
    want = set(meta.moe_layers)
    if seen != want:
        extra, lacking = sorted(seen - want), sorted(want - seen)
        hint = ""
        if opts.layer_numbering == "absolute" and seen == set(range(M)):
            hint = "; the log seems to number MoE layers from 0: add --layer-numbering moe"
        elif extra and set(extra) <= set(range(meta.num_layers)) - want:
            hint = f"; layer(s) {_compact(extra)} are dense in {meta.model}: drop their records with --drop-where"
        parts = []
        if extra:
            parts.append(f"layer(s) {_compact(extra)} are not MoE layers")
        if lacking:
            parts.append(f"MoE layer(s) {_compact(lacking)} have no record")
        raise TraceError(f"the log's {len(seen)} layers do not match model {meta.model} "
                         f"({M} MoE layers {_compact(want)} of {meta.num_layers}): {', '.join(parts)}{hint}")
    return layer


def _check_expert_ids(rows: _Rows, meta: TraceMeta, ctx: _Ctx) -> None:
    E = meta.num_experts
    bad = np.fromiter((e is not None and any(x < 0 or x >= E for x in e) for e in rows.experts),
                      dtype=bool, count=len(rows))
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise TraceError(f"{int(bad.sum())} record(s) name an expert id outside [0, {E}) of model "
                         f"{meta.model}, first at {ctx.where(rows, i)}: experts {rows.experts[i]} "
                         f"(wrong --model or shapes?)")


def _dedupe(rows: _Rows, layer: np.ndarray, tok_key: np.ndarray, ctx: _Ctx,
            conflicts_drop: bool) -> tuple[np.ndarray, np.ndarray]:
    """Rows to keep, and the indices of rows dropped for conflicting (for their positions)."""
    n = len(rows)
    has_key = ~np.isnan(tok_key)
    keep = np.ones(n, dtype=bool)
    if not has_key.any():
        return keep, np.zeros(0, dtype=np.int64)
    sel = np.flatnonzero(has_key)
    ex = [None if e is None else tuple(e) for e in rows.experts[sel]]
    d = pd.DataFrame({"r": rows.req[sel], "t": tok_key[sel].astype(np.int64), "l": layer[sel],
                      "e": pd.Series(ex, dtype=object).map(lambda t: hash(t)).to_numpy(), "i": sel})
    cell_dup = d.duplicated(["r", "t", "l"], keep=False).to_numpy()
    if not cell_dup.any():
        return keep, np.zeros(0, dtype=np.int64)
    dd = d[cell_dup]
    variants = dd.groupby(["r", "t", "l"])["e"].transform("nunique").to_numpy()
    same = dd[variants == 1]
    extra = same.duplicated(["r", "t", "l"], keep="first").to_numpy()
    keep[same["i"].to_numpy()[extra]] = False
    ctx.counts["duplicate_records"] += int(extra.sum())
    conflict = dd[variants > 1]
    conflict_rows = conflict["i"].to_numpy()
    if conflicts_drop and len(conflict):
        keep[conflict_rows] = False
        ctx.counts["conflicting_duplicate_cells"] += int(len(conflict.drop_duplicates(["r", "t", "l"])))
        ctx.counts["conflicting_duplicate_records"] += int(len(conflict))
        return keep, conflict_rows
    return keep, np.zeros(0, dtype=np.int64)


def _rank_in_group(req: np.ndarray, layer: np.ndarray) -> np.ndarray:
    """Order of appearance of each row within its (request, layer)."""
    return pd.DataFrame({"r": req, "l": layer}).groupby(["r", "l"], sort=False).cumcount().to_numpy(np.int64)


def _numbering_disagreements(req, layer, rank, logged, ctx: _Ctx) -> None:
    ok = ~np.isnan(logged)
    if not ok.any():
        return
    d = pd.DataFrame({"r": req[ok], "l": layer[ok], "k": rank[ok], "v": logged[ok].astype(np.int64)})
    cnt = d.groupby(["r", "k", "v"]).size().rename("n").reset_index()
    cnt = cnt.sort_values(["r", "k", "n", "v"], ascending=[True, True, False, True])
    mode = cnt.drop_duplicates(["r", "k"]).set_index(["r", "k"])["v"]
    expected = mode.reindex(pd.MultiIndex.from_arrays([d["r"], d["k"]])).to_numpy()
    d["bad"] = d["v"].to_numpy() != expected
    pairs = d.groupby(["r", "l"])["bad"].any()
    pairs = pairs[pairs]
    ctx.counts["renumbered_request_layers"] = int(len(pairs))
    ctx.counts["renumbered_layers"] = int(pairs.index.get_level_values("l").nunique())


def _unusable(rows: _Rows, meta: TraceMeta, ctx: _Ctx) -> np.ndarray:
    """Rows to drop for their content (counted); their positions still count."""
    K = meta.top_k
    null = np.fromiter((e is None for e in rows.experts), dtype=bool, count=len(rows))
    if rows.phase is not None:
        null |= np.fromiter((p is None for p in rows.phase), dtype=bool, count=len(rows))
    wrong = np.fromiter((e is not None and len(e) != K for e in rows.experts), dtype=bool, count=len(rows))
    rep = np.fromiter((e is not None and len(e) == K and len(set(e)) != K for e in rows.experts),
                      dtype=bool, count=len(rows))
    wrong &= ~null
    rep &= ~null
    if wrong.any() and wrong.sum() == len(rows):
        lengths = sorted({len(e) for e in rows.experts if e is not None})
        raise TraceError(f"every record lists {'/'.join(map(str, lengths))} experts but model {meta.model} "
                         f"has top_k={K} (wrong --model or --top-k?)")
    ctx.counts["incomplete_records"] += int(null.sum())
    ctx.counts["wrong_top_k"] += int(wrong.sum())
    ctx.counts["repeated_experts"] += int(rep.sum())
    return null | wrong | rep


def _assemble(rows: _Rows, meta: TraceMeta, opts: ImportOptions, ctx: _Ctx,
              span_hint: Optional[np.ndarray], default_phase: str) -> tuple[pa.Table, dict]:
    """From rows (request ordinals 0..R-1) to the trace table; returns (table, facts)."""
    R = int(rows.req.max()) + 1 if len(rows) else 0
    # 2. incomplete position info
    drop = np.isnan(rows.layer)
    if opts.token_index == "field":
        drop |= np.isnan(rows.tok)
    ctx.counts["incomplete_records"] += int(drop.sum())
    neg = ~drop & (rows.tok < 0)
    ctx.counts["invalid_token_index"] += int(neg.sum())
    rows = rows.take(np.flatnonzero(~(drop | neg)))
    if len(rows) == 0:
        raise TraceError("no record has a usable request, token and layer")
    # 3. layers and expert ids
    layer = _check_layers(rows, meta, opts, ctx)
    _check_expert_ids(rows, meta, ctx)
    # 4./5. duplicates, token numbering
    conflict_pos = (np.zeros(0, np.int64), np.zeros(0, np.int64))
    if opts.token_index == "field":
        keep, conflict_rows = _dedupe(rows, layer, rows.tok, ctx, conflicts_drop=True)
        conflict_pos = (rows.req[conflict_rows], rows.tok[conflict_rows].astype(np.int64))
        idx = np.flatnonzero(keep)
        rows, layer = rows.take(idx), layer[idx]
        tok = rows.tok.astype(np.int64)
    else:
        keep, _ = _dedupe(rows, layer, rows.tok, ctx, conflicts_drop=False)
        idx = np.flatnonzero(keep)
        rows, layer = rows.take(idx), layer[idx]
        tok = _rank_in_group(rows.req, layer)
        if np.isnan(rows.tok).all():
            ctx.notes.append("token indices are each record's order of appearance within its (request, layer); "
                             "no logged index to compare")
        else:
            _numbering_disagreements(rows.req, layer, tok, rows.tok, ctx)
            ctx.notes.append("token indices are each record's order of appearance within its (request, layer) "
                             "(--token-index order), not the logged field")
    # request spans: every position the log shows, including rows about to be dropped
    span = np.zeros(R, dtype=np.int64)
    np.maximum.at(span, rows.req, tok + 1)
    if len(conflict_pos[0]):
        np.maximum.at(span, conflict_pos[0], conflict_pos[1] + 1)
    if span_hint is not None:
        span = np.maximum(span, span_hint)
    first = np.full(R, np.iinfo(np.int64).max, dtype=np.int64)
    np.minimum.at(first, rows.req, tok)
    late_start = bool(len(rows)) and bool((first[np.unique(rows.req)] > 0).all())
    # prompt lengths (per request)
    plen = None
    if rows.plen is not None:
        plen = _prompt_lengths(rows, R, ctx)
    # 6. unusable content
    bad = _unusable(rows, meta, ctx)
    idx = np.flatnonzero(~bad)
    rows, layer, tok = rows.take(idx), layer[idx], tok[idx]
    # 7. missing cells
    M = len(meta.moe_layers)
    lookup = {l: i for i, l in enumerate(meta.moe_layers)}
    moe = np.fromiter((lookup[v] for v in layer), dtype=np.int64, count=len(layer))
    present = np.bincount(rows.req, minlength=R)
    missing = span * M - present
    ctx.counts["missing_cells"] = int(missing.sum())
    ctx.counts["ragged_requests"] = int(np.count_nonzero(missing > 0))
    prefix = _complete_prefix(rows.req, moe, tok, R, M)
    if ctx.counts["missing_cells"]:
        if opts.on_ragged == "error":
            kept = int(prefix.sum())
            left = int(np.count_nonzero(prefix))
            found = "; ".join(f"{k}={v}" for k, v in ctx.counts.items() if v)
            raise TraceError(
                f"the log has {ctx.counts['missing_cells']} missing (request, token, layer) cells in "
                f"{ctx.counts['ragged_requests']} of {R} requests ({found}); choose --on-ragged truncate "
                f"(cut each request to its longest prefix complete on every MoE layer: keeps {kept} of "
                f"{int(span.sum())} token positions in {left} requests) or --on-ragged keep (write the "
                f"rows as they are; replay then needs workload.on_ragged=truncate)"
                + ("; no request has a record at position 0: if the log numbers tokens from 1 or its "
                   "leading records were dropped, --token-index order numbers them from 0"
                   if late_start and opts.token_index == "field" else ""))
        if opts.on_ragged == "truncate":
            cut = tok >= prefix[rows.req]
            ctx.counts["truncated_rows"] = int(cut.sum())
            ctx.counts["truncated_requests"] = int(np.count_nonzero((prefix < span) & (prefix > 0)))
            ctx.counts["emptied_requests"] = int(np.count_nonzero((prefix == 0) & (span > 0)))
            ctx.counts["truncated_positions"] = int((span - prefix).sum())
            idx = np.flatnonzero(~cut)
            rows, layer, tok = rows.take(idx), layer[idx], tok[idx]
            span = prefix
        else:
            empty = int(np.count_nonzero((present == 0) & (span > 0)))
            ctx.notes.append("ragged requests were written as they are (--on-ragged keep): replay them with "
                             "workload.on_ragged=truncate" + (f"; {empty} request(s) had no usable row left "
                                                             f"and are absent" if empty else ""))
    if len(rows) == 0:
        raise TraceError("no routing row is left to write after dropping irregular records ("
                         + "; ".join(f"{k}={v}" for k, v in ctx.counts.items() if v) + ")")
    # phase
    if rows.phase is not None:
        phase = rows.phase
    elif plen is not None:
        phase = np.where(tok < plen[rows.req], "prefill", "decode").astype(object)
    else:
        phase = _obj([default_phase] * len(rows))
    # order: request (first appearance), token, layer
    order = np.lexsort((layer, tok, rows.req))
    rows, layer, tok, phase = rows.take(order), layer[order], tok[order], phase[order]
    cols = {
        "request_id": pa.array(rows.req, type=pa.int64()),
        "token_index": pa.array(tok, type=pa.int64()),
        "phase": pa.array(phase.tolist(), type=pa.string()),
        "layer": pa.array(layer, type=pa.int32()),
        "experts": pa.array(rows.experts.tolist(), type=COLUMN_TYPES["experts"]),
    }
    if rows.weights is not None:
        cols["weights"] = pa.array(rows.weights.tolist(), type=COLUMN_TYPES["weights"])
    if rows.predicted is not None:
        cols["predicted_experts"] = pa.array(
            [None if p is None else [min(max(x, -32768), 32767) for x in p] for p in rows.predicted],
            type=COLUMN_TYPES["predicted_experts"])
    return pa.table(cols), {"span": span}


def _prompt_lengths(rows: _Rows, R: int, ctx: _Ctx) -> np.ndarray:
    d = pd.DataFrame({"r": rows.req, "p": rows.plen}).dropna()
    per = d.groupby("r")["p"].agg(["min", "max"])
    varying = per[per["min"] != per["max"]]
    if len(varying):
        r = int(varying.index[0])
        raise TraceError(f"the prompt-length field takes several values ({int(varying.loc[r, 'min'])}, "
                         f"{int(varying.loc[r, 'max'])}) within one request (ordinal {r}); it must be "
                         f"constant per request")
    out = np.full(R, -1, dtype=np.int64)
    out[per.index.to_numpy(np.int64)] = per["min"].to_numpy(np.int64)
    lacking = np.setdiff1d(np.unique(rows.req), per.index.to_numpy(np.int64))
    if len(lacking):
        raise TraceError(f"request ordinal {int(lacking[0])} has no prompt-length value in any record")
    return out


def _complete_prefix(req, moe, tok, R: int, M: int) -> np.ndarray:
    """Per request, the longest prefix of positions present on every MoE layer (cells unique).

    Sorted by token within (request, layer), positions 0..p-1 are exactly the rows whose token
    equals their rank in the group (after the first gap, token > rank for good).
    """
    if R == 0 or len(req) == 0:
        return np.zeros(R, dtype=np.int64)
    order = np.lexsort((tok, moe, req))
    group = req[order] * M + moe[order]
    starts = np.flatnonzero(np.r_[True, group[1:] != group[:-1]])
    sizes = np.diff(np.r_[starts, len(order)])
    rank = np.arange(len(order)) - np.repeat(starts, sizes)
    counts = np.bincount(group[tok[order] == rank], minlength=R * M)
    return counts.reshape(R, M).min(axis=1)


# ---------------------------------------------------------------------------------------------
# Entry points


def _meta_from_moelens(m: dict, files: list[_File], model: Optional[ModelSpec],
                       hf_names: Mapping[str, str], source: str) -> TraceMeta:
    dense = set(m["dense"])
    where = f"MoELens trace {files[0].path}"
    name = hf_names.get(m["model_id"], KNOWN_HF_MODELS.get(m["model_id"], m["model_id"]))
    meta = TraceMeta(model=name, num_experts=m["num_experts"], top_k=m["top_k_experts"],
                     num_layers=m["num_layers"],
                     moe_layers=tuple(i for i in range(m["num_layers"]) if i not in dense), source=source)
    meta.validate(where)
    if model is not None:
        for key in ("num_experts", "top_k", "num_layers", "moe_layers"):
            mine, theirs = getattr(meta, key), getattr(model, key)
            if tuple(mine) != tuple(theirs) if key == "moe_layers" else mine != theirs:
                show = (lambda v: _compact(v)) if key == "moe_layers" else (lambda v: v)
                raise TraceError(f"{where} was recorded for {m['model_id']} with {key}={show(mine)}; "
                                 f"--model {model.name} has {key}={show(theirs)}")
        meta = TraceMeta(model.name, meta.num_experts, meta.top_k, meta.num_layers, meta.moe_layers, source)
    return meta


def build_trace(sources: Sequence, options: ImportOptions = ImportOptions(), *,
                model: Optional[ModelSpec] = None, shapes: Optional[TraceMeta] = None,
                hf_names: Optional[Mapping[str, str]] = None,
                dest: str = "") -> tuple[pd.DataFrame, TraceMeta, ImportReport]:
    """Read ``sources`` and return (trace frame, metadata, report) without writing anything.

    Generic formats need ``model`` (a catalog ModelSpec) or ``shapes`` (a TraceMeta with
    num_experts, top_k, num_layers, moe_layers); MoELens takes its shapes from the files and checks
    them against ``model`` when given. ``hf_names`` maps more Hugging Face ids to catalog names.
    """
    opts = options
    opts.validate()
    if model is not None and shapes is not None:
        raise ConfigError("--model and explicit shapes (--num-experts/--top-k/--num-layers) are "
                          "alternatives; give one")
    paths = discover(sources, opts.format)
    loaded = [_load(p, opts.format) for p in paths]
    kinds = {f.kind for f in loaded}
    moelens = "moelens" in kinds
    if moelens and kinds != {"moelens"}:
        other = next(f for f in loaded if f.kind != "moelens")
        raise TraceError(f"{other.path} is not a MoELens file but other sources are; import MoELens "
                         f"files and generic logs separately")
    fmt = "moelens" if moelens else "+".join(sorted({"csv" if k == "csv" else "jsonl" for k in kinds}))
    source = f"moesim-trace import ({fmt}): {' '.join(str(s) for s in sources)}"
    ctx = _Ctx(paths, "moelens" if moelens else "generic")
    if moelens:
        given = [name for name, v in (("--fields", opts.fields), ("--group", opts.group),
                                      ("--drop-where", opts.drop_where),
                                      ("--layer-from-filename", opts.layer_from_filename),
                                      ("--prompt-len-field", opts.prompt_len_field)) if v]
        if given or shapes is not None:
            raise ConfigError(f"{(given or ['explicit shapes'])[0]} applies to generic logs; MoELens files "
                              f"carry their own fields and shapes")
        if opts.layer_numbering != "absolute":
            raise ConfigError("--layer-numbering moe applies to generic logs; MoELens numbers layers absolutely")
        rows, m, span_hint = _moelens_rows(loaded, ctx, opts.drop_requests)
        meta = _meta_from_moelens(m, loaded, model, dict(hf_names or {}), source)
        labels = [p.name for p in paths[ctx.counts["dropped_warmup_requests"]:]]
        int_ids, label_desc, default_phase = False, "file", "prefill"
    else:
        if model is None and shapes is None:
            raise ConfigError("a generic router log needs the model's shapes: give --model NAME, or "
                              "--num-experts, --top-k and --num-layers (and --dense-layers)")
        meta = TraceMeta.for_model(model, source) if model is not None else \
            TraceMeta(shapes.model, shapes.num_experts, shapes.top_k, shapes.num_layers, shapes.moe_layers, source)
        meta.validate("--num-experts/--top-k/--num-layers/--dense-layers")
        rows, labels, int_ids, label_desc = _generic_rows(loaded, opts, ctx)
        span_hint, default_phase = None, opts.phase
    table, facts = _assemble(rows, meta, opts, ctx, span_hint, default_phase)

    # request ids: the logged integers when that is what identified requests, else 0..N-1
    req = table.column("request_id").to_numpy()
    kept = np.unique(req)  # ordinals, ascending = first appearance
    report = ImportReport(dest=str(dest), sources=[str(s) for s in sources], files=len(paths), format=fmt,
                          model=meta.model, num_experts=meta.num_experts, top_k=meta.top_k,
                          num_layers=meta.num_layers, moe_layers=list(meta.moe_layers),
                          records_read=ctx.records_read, on_ragged=opts.on_ragged)
    if int_ids:
        ids = np.asarray([_as_int(labels[i]) for i in kept], dtype=np.int64)
    else:
        ids = np.arange(len(kept), dtype=np.int64)
        report.request_ids = {int(i): (list(labels[o]) if isinstance(labels[o], tuple) else labels[o])
                              for i, o in zip(ids, kept)}
        if moelens:
            report.notes.insert(0, f"request ids 0..{len(kept) - 1} are the {len(kept)} prompt files in "
                                   f"natural name order ({labels[kept[0]]} -> 0)")
        else:
            report.notes.insert(0, f"request ids: {len(kept)} distinct ({label_desc}) value(s) mapped to "
                                   f"0..{len(kept) - 1} in order of first appearance")
    remap = np.zeros(int(req.max()) + 1, dtype=np.int64)
    remap[kept] = ids
    table = table.set_column(0, "request_id", pa.array(remap[req], type=pa.int64()))
    df = table.to_pandas(types_mapper=lambda t: pd.ArrowDtype(t) if pa.types.is_list(t) else None)

    check = validate_trace(df, meta, where=f"imported trace {dest}".strip())
    if check.phase_errors:
        raise TraceError(f"{check.phase_errors} rows have a phase out of order (a prefill position after "
                         f"a decode one of the same request, or layers disagreeing on a position's phase); "
                         f"check the phase field")
    fatal = {k: getattr(check, k) for k in check.FATAL if getattr(check, k)}
    if fatal:  # the steps above remove all of these; a failure here is a bug
        raise TraceError(f"internal error: the imported trace still has {fatal}")
    report.irregularities.update(ctx.counts)
    report.irregularities["bad_weights"] = check.bad_weights
    report.irregularities["bad_predicted"] = check.bad_predicted
    report.notes += ctx.notes
    span = facts["span"]
    report.requests = int(len(kept))
    report.rows = int(table.num_rows)
    report.layers = len(set(df["layer"].tolist()))
    positions = df.drop_duplicates(["request_id", "token_index"])
    report.prefill_tokens = int((positions["phase"] == "prefill").sum())
    report.decode_tokens = int((positions["phase"] == "decode").sum())
    report.tokens = int(sum(int(span[o]) for o in kept)) if opts.on_ragged != "keep" \
        else int(positions.groupby("request_id")["token_index"].max().add(1).sum())
    return df, meta, report


def import_trace(sources: Sequence, dest, options: ImportOptions = ImportOptions(), *,
                 model: Optional[ModelSpec] = None, shapes: Optional[TraceMeta] = None,
                 hf_names: Optional[Mapping[str, str]] = None) -> ImportReport:
    """Read ``sources``, write the trace to ``dest`` (atomically) and return the report.

    Nothing is written when a TraceError/ConfigError is raised. ``dest`` must end in ``.parquet``
    and must not be one of the sources.
    """
    dest = Path(dest)
    if dest.suffix.lower() != ".parquet":
        raise ConfigError(f"DEST={dest} must be a .parquet file (the last argument is where the trace goes)")
    if dest.is_dir():
        raise ConfigError(f"DEST={dest} is a directory; name a .parquet file")
    if any(dest.resolve() == p.resolve() for p in discover(sources, options.format)):
        raise ConfigError(f"DEST={dest} is one of the sources; write the trace elsewhere")
    df, meta, report = build_trace(sources, options, model=model, shapes=shapes, hf_names=hf_names,
                                   dest=str(dest))
    write_trace(dest, df, meta)
    return report
