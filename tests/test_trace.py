"""Router-trace schema: Parquet round trip, validation counts on hand-made bad traces, replay
conversion (ordering, lengths, truncation), and one-line errors."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from workloads.model import ModelSpec
from workloads.requests import Request, WorkloadConfig, build_requests
from workloads.synthetic import RoutingConfig, generate_routing, generate_weights
from workloads.trace import (TraceError, TraceMeta, load_trace_requests, read_trace,
                             requests_to_frame, validate_trace, write_trace)
from workloads.validation import ConfigError

MIXTRAL = ModelSpec(name="mixtral_8x7b", hidden_size=4096, num_layers=32, num_experts=8, top_k=2,
                    expert_intermediate_size=14336, num_attention_heads=32, num_kv_heads=8,
                    head_dim=128, vocab_size=32000)
# A small model with a dense first layer: MoE layers are 1, 2, 3.
TINY = ModelSpec(name="tiny_moe", hidden_size=64, num_layers=4, num_experts=8, top_k=2,
                 expert_intermediate_size=128, num_attention_heads=4, num_kv_heads=4, head_dim=16,
                 vocab_size=100, dense_layers=(0,), dense_intermediate_size=256)
QWEN_LIKE = ModelSpec(name="qwen_like", hidden_size=64, num_layers=4, num_experts=64, top_k=8,
                      expert_intermediate_size=128, num_attention_heads=4, num_kv_heads=4,
                      head_dim=16, vocab_size=100)


def make_requests(model, specs, seed=0):
    """specs: [(request_id, prompt_len, output_len)] -> Requests with synthetic routing."""
    rng = np.random.default_rng(seed)
    routing = generate_routing(model, RoutingConfig(), [p + o - 1 for _, p, o in specs], rng)
    return [Request(rid, 0.0, p, o, r) for (rid, p, o), r in zip(specs, routing)]


@pytest.fixture
def tiny_trace():
    reqs = make_requests(TINY, [(7, 3, 3), (2, 2, 4)])  # 5 positions each, first appearance 7, 2
    return reqs, requests_to_frame(reqs, TINY), TraceMeta.for_model(TINY, "unit test")


def one_line(exc_info):
    msg = str(exc_info.value)
    assert "\n" not in msg
    return msg


def row(df, request_id, token, layer):
    hit = df.index[(df.request_id == request_id) & (df.token_index == token) & (df.layer == layer)]
    assert len(hit) == 1
    return hit[0]


def with_lists(df, column, index, value):
    """A copy of df whose list column has ``value`` at row label ``index`` (object dtype)."""
    out = df.copy()
    values = [list(v) for v in out[column]]
    values[list(out.index).index(index)] = value
    out[column] = pd.Series(values, index=out.index, dtype=object)
    return out


# ------------------------------------------------------------------ round trip


def test_write_read_round_trip_is_exact(tmp_path):
    reqs = make_requests(MIXTRAL, [(11, 5, 4), (3, 1, 6), (8, 7, 1)])
    weights = [generate_weights(r.experts, np.random.default_rng(1)) for r in reqs]
    df = requests_to_frame(reqs, MIXTRAL, weights)
    meta = TraceMeta.for_model(MIXTRAL, "round trip")
    path = tmp_path / "trace.parquet"
    write_trace(path, df, meta)
    df2, meta2 = read_trace(path)
    pd.testing.assert_frame_equal(df, df2)
    assert meta2 == meta and meta2.moe_layers == tuple(range(32))
    assert [p.name for p in tmp_path.iterdir()] == ["trace.parquet"]  # no temp file left
    md = pq.ParquetFile(path).schema_arrow.metadata
    assert md[b"model"] == b"mixtral_8x7b" and md[b"moe_layers"].startswith(b"[0, 1, 2")

    got = load_trace_requests(path, MIXTRAL)
    assert [g.request_id for g in got] == [11, 3, 8]  # order of first appearance
    for g, r in zip(got, reqs):
        assert (g.prompt_len, g.output_len) == (r.prompt_len, r.output_len)
        assert g.experts.dtype == np.int16 and np.array_equal(g.experts, r.experts)
    assert validate_trace(df, meta, MIXTRAL).ok()


def test_frame_layout(tiny_trace):
    reqs, df, meta = tiny_trace
    assert len(df) == 2 * 5 * 3
    assert sorted(df.layer.unique()) == [1, 2, 3]  # absolute layer numbers, dense layer 0 absent
    r7 = df[df.request_id == 7]
    assert (r7.phase == "prefill").sum() == 3 * 3 and (r7.phase == "decode").sum() == 2 * 3
    first = r7[(r7.token_index == 0) & (r7.layer == 2)].experts.iloc[0]
    assert list(first) == list(reqs[0].experts[0, 1])


def test_overwrite_is_atomic_replace(tmp_path, tiny_trace):
    _, df, meta = tiny_trace
    path = tmp_path / "t.parquet"
    write_trace(path, df.iloc[:6], meta)
    write_trace(path, df, meta)
    assert len(read_trace(path)[0]) == len(df)
    assert [p.name for p in tmp_path.iterdir()] == ["t.parquet"]


def test_build_requests_replays_a_trace(tmp_path, tiny_trace):
    reqs, df, meta = tiny_trace
    path = tmp_path / "t.parquet"
    write_trace(path, df, meta)
    got = build_requests(WorkloadConfig(kind="trace", path=str(path), num_requests=None), TINY, seed=0)
    assert [(r.request_id, r.prompt_len, r.output_len) for r in got] == [(7, 3, 3), (2, 2, 4)]
    assert all(np.array_equal(g.experts, r.experts) for g, r in zip(got, reqs))
    one = load_trace_requests(path, TINY, limit=1)
    assert [r.request_id for r in one] == [7]


# ------------------------------------------------------------------ validation counts


def counts(report):
    return report.issues()


def test_clean_trace_has_no_issues(tiny_trace):
    _, df, meta = tiny_trace
    rep = validate_trace(df, meta, TINY)
    assert rep.ok() and rep.rows == 30 and rep.requests == 2
    assert rep.summary() == "30 rows, 2 requests: no irregularities"


def test_one_dropped_row_is_one_missing_row(tiny_trace):
    _, df, meta = tiny_trace
    rep = validate_trace(df.drop(index=row(df, 2, 1, 3)), meta)
    assert counts(rep) == {"missing_rows": 1, "ragged_requests": 1}
    assert "missing_rows=1" in rep.summary() and "\n" not in rep.summary()


def test_dropped_last_token_of_one_layer_is_missing(tiny_trace):
    _, df, meta = tiny_trace
    rep = validate_trace(df.drop(index=row(df, 7, 4, 1)), meta)  # span still 5 via layers 2, 3
    assert counts(rep) == {"missing_rows": 1, "ragged_requests": 1}


def test_expert_id_out_of_range(tiny_trace):
    _, df, meta = tiny_trace
    bad = with_lists(df, "experts", row(df, 7, 2, 2), [99, 1])
    assert counts(validate_trace(bad, meta)) == {"expert_out_of_range": 1}
    neg = with_lists(df, "experts", row(df, 7, 2, 2), [3, -1])
    assert counts(validate_trace(neg, meta)) == {"expert_out_of_range": 1}


def test_wrong_top_k_and_repeated_experts(tiny_trace):
    _, df, meta = tiny_trace
    three = with_lists(df, "experts", row(df, 2, 0, 1), [1, 2, 3])
    assert counts(validate_trace(three, meta)) == {"wrong_top_k": 1}
    twice = with_lists(df, "experts", row(df, 2, 0, 1), [5, 5])
    assert counts(validate_trace(twice, meta)) == {"repeated_experts": 1}


def test_layer_not_moe(tiny_trace):
    _, df, meta = tiny_trace
    bad = df.copy()
    bad.loc[row(df, 2, 0, 1), "layer"] = 0        # the dense layer
    bad.loc[row(df, 2, 1, 1), "layer"] = 17       # beyond num_layers
    rep = validate_trace(bad, meta)
    assert rep.layer_not_moe == 2 and rep.missing_rows == 2 and rep.ragged_requests == 1


def test_duplicate_row(tiny_trace):
    _, df, meta = tiny_trace
    bad = pd.concat([df, df.loc[[row(df, 7, 3, 3)]]], ignore_index=True)
    assert counts(validate_trace(bad, meta)) == {"duplicate_rows": 1}


def test_phase_errors(tiny_trace):
    _, df, meta = tiny_trace
    late = df.copy()
    late.loc[row(df, 7, 4, 2), "phase"] = "prefill"  # prefill after decode
    assert counts(validate_trace(late, meta)) == {"phase_errors": 1}
    junk = df.copy()
    junk.loc[row(df, 2, 0, 3), "phase"] = "warmup"
    assert counts(validate_trace(junk, meta)) == {"phase_errors": 1}


def test_negative_token_index_and_bad_weights(tiny_trace):
    reqs, df, meta = tiny_trace
    bad = df.copy()
    bad.loc[row(df, 2, 4, 3), "token_index"] = -1
    rep = validate_trace(bad, meta)
    assert rep.bad_token_index == 1 and rep.missing_rows == 1
    w = requests_to_frame(reqs, TINY, [np.full(r.experts.shape, 0.5, np.float32) for r in reqs])
    w = with_lists(w, "weights", row(w, 7, 0, 1), [1.0])
    assert counts(validate_trace(w, meta)) == {"bad_weights": 1}


def test_model_mismatch_message():
    meta = TraceMeta.for_model(QWEN_LIKE, "capture")
    df = requests_to_frame(make_requests(QWEN_LIKE, [(0, 2, 2)]), QWEN_LIKE)
    with pytest.raises(TraceError) as exc:
        validate_trace(df, meta, MIXTRAL)
    msg = one_line(exc)
    assert "'qwen_like' with num_experts=64" in msg and "mixtral_8x7b has num_experts=8" in msg
    all_moe = ModelSpec(name="tiny_all_moe", hidden_size=64, num_layers=4, num_experts=8, top_k=2,
                        expert_intermediate_size=128, num_attention_heads=4, num_kv_heads=4,
                        head_dim=16, vocab_size=100)
    with pytest.raises(TraceError, match=r"moe_layers=\[1, 2, 3\]; the scenario's model tiny_all_moe "
                                         r"has moe_layers=\[0, 1, 2, 3\]"):
        TraceMeta.for_model(TINY, "x").check_model(all_moe)


def test_model_mismatch_on_load(tmp_path):
    path = tmp_path / "q.parquet"
    write_trace(path, requests_to_frame(make_requests(QWEN_LIKE, [(0, 2, 2)]), QWEN_LIKE),
                TraceMeta.for_model(QWEN_LIKE, "capture"))
    with pytest.raises(TraceError) as exc:
        load_trace_requests(path, MIXTRAL)
    assert str(path) in one_line(exc) and "num_experts=64" in str(exc.value)


# ------------------------------------------------------------------ replay: truncation and errors


def test_ragged_trace_errors_with_hint(tmp_path, tiny_trace):
    _, df, meta = tiny_trace
    path = tmp_path / "r.parquet"
    write_trace(path, df.drop(index=row(df, 2, 3, 2)), meta)
    with pytest.raises(TraceError) as exc:
        load_trace_requests(path, TINY)
    assert "missing_rows=1" in one_line(exc) and "on_ragged=truncate" in str(exc.value)


def test_truncate_keeps_shortest_complete_prefix(tmp_path):
    reqs = make_requests(TINY, [(1, 4, 5), (2, 3, 3), (3, 2, 2), (4, 3, 1)])  # T = 8, 5, 3, 3
    df = requests_to_frame(reqs, TINY)
    drop = [row(df, 1, 6, 2), row(df, 1, 7, 1),   # request 1: complete prefix 6 (cut in decode)
            row(df, 2, 1, 3),                      # request 2: prefix 1 (cut inside the prompt)
            row(df, 3, 0, 2)]                      # request 3: nothing complete -> dropped
    path = tmp_path / "r.parquet"
    write_trace(path, df.drop(index=drop), TraceMeta.for_model(TINY, "t"))
    with pytest.warns(UserWarning, match=r"dropped 1 request"):
        got = load_trace_requests(path, TINY, on_ragged="truncate")
    assert [(g.request_id, g.prompt_len, g.output_len) for g in got] == [(1, 4, 3), (2, 1, 1), (4, 3, 1)]
    assert np.array_equal(got[0].experts, reqs[0].experts[:6])
    assert np.array_equal(got[1].experts, reqs[1].experts[:1])
    assert np.array_equal(got[2].experts, reqs[3].experts)


def test_fatal_irregularities_refuse_replay(tmp_path, tiny_trace):
    _, df, meta = tiny_trace
    path = tmp_path / "bad.parquet"
    write_trace(path, with_lists(df, "experts", row(df, 7, 0, 1), [99, 1]), meta)
    for mode in ("error", "truncate"):
        with pytest.raises(TraceError) as exc:
            load_trace_requests(path, TINY, on_ragged=mode)
        assert "expert_out_of_range=1" in one_line(exc)


def test_prefill_only_and_decode_only_requests(tmp_path, tiny_trace):
    _, df, meta = tiny_trace
    df = df.copy()
    df.loc[df.request_id == 7, "phase"] = "prefill"
    df.loc[df.request_id == 2, "phase"] = "decode"
    path = tmp_path / "p.parquet"
    write_trace(path, df, meta)
    got = load_trace_requests(path, TINY)
    assert [(g.prompt_len, g.output_len) for g in got] == [(5, 1), (1, 5)]


@pytest.mark.parametrize("case", ["missing", "empty_file", "not_parquet", "no_rows", "no_column",
                                  "no_metadata"])
def test_file_errors_are_one_line(tmp_path, tiny_trace, case):
    _, df, meta = tiny_trace
    path = tmp_path / "t.parquet"
    needle = {"missing": "does not exist", "empty_file": "not a readable Parquet file",
              "not_parquet": "not a readable Parquet file", "no_rows": "has no rows",
              "no_column": "lacks column(s) experts", "no_metadata": "lacks metadata key(s) top_k"}[case]
    if case == "empty_file":
        path.write_bytes(b"")
    elif case == "not_parquet":
        path.write_text("request_id,token_index\n1,2\n")
    elif case == "no_rows":
        write_trace(path, df.iloc[:0], meta)
    elif case == "no_column":
        pq.write_table(pa.Table.from_pandas(df.drop(columns="experts"), preserve_index=False)
                       .replace_schema_metadata(meta.to_metadata()), path)
    elif case == "no_metadata":
        md = {k: v for k, v in meta.to_metadata().items() if k != b"top_k"}
        pq.write_table(pa.Table.from_pandas(df, preserve_index=False).replace_schema_metadata(md), path)
    with pytest.raises(TraceError) as exc:
        load_trace_requests(path, TINY)
    assert needle in one_line(exc)
    assert isinstance(exc.value, ConfigError)


def test_large_trace_round_trips(tmp_path):
    """640k rows come back exactly (how fast: ``python benchmarks/data_speed.py``)."""
    reqs = make_requests(MIXTRAL, [(i, 100, 101) for i in range(100)])  # 640k rows
    df = requests_to_frame(reqs, MIXTRAL)
    assert len(df) == 100 * 200 * MIXTRAL.num_moe_layers
    path = tmp_path / "big.parquet"
    write_trace(path, df, TraceMeta.for_model(MIXTRAL, "big"))
    got = load_trace_requests(path, MIXTRAL)
    assert len(got) == 100 and all(np.array_equal(g.experts, r.experts) for g, r in zip(got, reqs))
    assert [(g.prompt_len, g.output_len) for g in got] == [(100, 101)] * 100
