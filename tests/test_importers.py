"""``moesim-trace import``: field mapping, every kind of messy log with its count, the ragged
choices, hard errors, and the real MoELens traces (known answers from the JSON files)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from sim.trace_cli import main
from workloads.trace import TraceError, load_trace_requests, read_trace

TRACES = Path(__file__).resolve().parents[2] / "shared" / "traces"
DEEPSEEK = TRACES / "moelens" / "DeepSeek" / "deepseek_routing_trace"
JETMOE = TRACES / "moelens" / "JETMoe" / "jetmoe_routing_trace"

# A small made-up model: 8 experts, top-2, layers 0..2 with layer 0 dense -> MoE layers 1, 2.
SHAPES = ["--num-experts", "8", "--top-k", "2", "--num-layers", "3", "--dense-layers", "0"]
LAYERS = (1, 2)


def route(req: int, tok: int, layer: int) -> list[int]:
    """A deterministic, distinct top-2 per cell, so every row can be checked by hand."""
    a = (3 * req + tok + 2 * layer) % 8
    return [a, (a + 1 + req % 3) % 8]


def records(reqs: dict, layers=LAYERS, skip=()) -> list[dict]:
    """One record per (request, token, layer) in logger order (token-major), minus ``skip`` cells."""
    out = []
    for r, T in reqs.items():
        for t in range(T):
            for layer in layers:
                if (r, t, layer) not in skip:
                    out.append({"request_id": r, "token_index": t, "layer": layer,
                                "experts": route(r, t, layer), "weights": [0.7, 0.3]})
    return out


def write_jsonl(path: Path, recs: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path


def write_csv(path: Path, recs: list[dict]) -> Path:
    names = list(dict.fromkeys(k for r in recs for k in r))
    with path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=names)
        w.writeheader()
        for r in recs:
            w.writerow({k: json.dumps(v) if isinstance(v, list) else v for k, v in r.items()})
    return path


def run(capsys, *args) -> tuple[int, str, str]:
    status = main(["import", *map(str, args)])
    out = capsys.readouterr()
    return status, out.out, out.err


def imported(capsys, tmp_path, srcs, *extra, name="out.parquet"):
    dest = tmp_path / name
    rep = tmp_path / (name + ".json")
    status, out, err = run(capsys, *srcs, dest, *extra, "--json", rep)
    assert status == 0, err
    df, meta = read_trace(dest)
    return df, meta, json.loads(rep.read_text()), out


def cells(df) -> dict:
    return {(int(r), int(t), int(l)): list(e) for r, t, l, e in
            zip(df.request_id, df.token_index, df.layer, df.experts)}


# ---------------------------------------------------------------------------------------------
# Mapping


def test_field_mapping_and_group_assign_ids_in_order_of_first_appearance(tmp_path, capsys):
    # Two datasets reuse problem ids: only (dataset, problem_id) identifies a request.
    keys = [("mbpp", 7), ("gsm8k", 1), ("mbpp", 1)]
    recs = []
    for t in range(3):
        for i, (ds, pid) in enumerate(keys):
            for layer in LAYERS:
                recs.append({"dataset": ds, "problem_id": pid, "token_idx": t, "layer_no": layer,
                             "topk": route(i, t, layer), "gating_probs": [0.6, 0.4]})
    fields = "request=problem_id,token=token_idx,layer=layer_no,experts=topk,weights=gating_probs"
    src = write_jsonl(tmp_path / "log.jsonl", recs)
    df, meta, rep, out = imported(capsys, tmp_path, [src], *SHAPES, "--fields", fields,
                                  "--group", "dataset,problem_id")
    assert rep["requests"] == 3 and rep["tokens"] == 9 and rep["rows"] == 18 and rep["layers"] == 2
    assert rep["request_ids"] == {"0": ["mbpp", 7], "1": ["gsm8k", 1], "2": ["mbpp", 1]}
    assert "3 distinct (dataset, problem_id) value(s) mapped to 0..2" in out
    assert cells(df) == {(i, t, l): route(i, t, l) for i in range(3) for t in range(3) for l in LAYERS}
    assert np.allclose(np.stack(df.weights.tolist()), [0.6, 0.4])
    assert set(df.phase) == {"decode"}  # no phase field: every row is decode
    assert (meta.num_experts, meta.top_k, meta.num_layers, meta.moe_layers) == (8, 2, 3, (1, 2))
    assert str(src) in meta.source and "jsonl" in meta.source
    assert sum(rep["irregularities"].values()) == 0

    # The same log as CSV (lists as JSON in cells) gives the same trace.
    df_csv, _, _, _ = imported(capsys, tmp_path, [write_csv(tmp_path / "log.csv", recs)], *SHAPES,
                               "--fields", fields, "--group", "dataset,problem_id", name="csv.parquet")
    assert cells(df_csv) == cells(df)


def test_integer_request_ids_are_kept_and_replay_loads(tmp_path, capsys):
    src = write_csv(tmp_path / "log.csv", records({17: 3, 4: 2}))
    df, _, rep, _ = imported(capsys, tmp_path, [src], *SHAPES)  # default field names
    assert sorted(set(df.request_id)) == [4, 17] and rep["request_ids"] == {}
    reqs = load_trace_requests(tmp_path / "out.parquet", _model(8, 2, 3, (0,)))
    assert [(r.request_id, r.prompt_len, r.output_len) for r in reqs] == [(17, 1, 3), (4, 1, 2)]
    assert reqs[0].experts[2, 1].tolist() == route(17, 2, 2)


def test_phase_field_and_prompt_length_field(tmp_path, capsys):
    recs = records({0: 4})
    for r in recs:
        r["stage"] = "PROMPT" if r["token_index"] < 3 else "generate"
        r["plen"] = 2
    src = write_jsonl(tmp_path / "log.jsonl", recs)
    imported(capsys, tmp_path, [src], *SHAPES, "--fields", "phase=stage")
    (req,) = load_trace_requests(tmp_path / "out.parquet", _model(8, 2, 3, (0,)))
    assert (req.prompt_len, req.output_len) == (3, 2)
    _, _, rep, _ = imported(capsys, tmp_path, [src], *SHAPES, "--prompt-len-field", "plen", name="p.parquet")
    (req,) = load_trace_requests(tmp_path / "p.parquet", _model(8, 2, 3, (0,)))
    assert (req.prompt_len, req.output_len) == (2, 3)
    assert (rep["prefill_tokens"], rep["decode_tokens"]) == (2, 2)


def _model(E, K, L, dense):
    from workloads.model import ModelSpec
    return ModelSpec(name="custom", hidden_size=64, num_layers=L, num_experts=E, top_k=K,
                     expert_intermediate_size=64, num_attention_heads=4, num_kv_heads=4, head_dim=16,
                     vocab_size=100, dense_layers=dense, dense_intermediate_size=64 if dense else 0)


# ---------------------------------------------------------------------------------------------
# Messy logs: each kind is counted


def test_warmup_requests_and_drop_where_are_counted(tmp_path, capsys):
    recs = records({99: 2, 0: 3, 1: 2})          # request 99 is a warm-up dummy batch
    for r in recs:
        r["pad"] = False
    junk = [{**r, "pad": True, "experts": [-1, -1]} for r in records({0: 1})]
    src = write_jsonl(tmp_path / "log.jsonl", recs + junk)
    df, _, rep, out = imported(capsys, tmp_path, [src], *SHAPES, "--drop-requests", "1",
                               "--drop-where", "pad=true")
    irr = rep["irregularities"]
    assert irr["dropped_where_records"] == 2
    assert (irr["dropped_warmup_requests"], irr["dropped_warmup_records"]) == (1, 4)
    assert sorted(set(df.request_id)) == [0, 1] and rep["rows"] == 10
    assert "dropped_where_records: 2" in out and "dropped_warmup_requests: 1" in out


def test_token_indices_renumbered_per_layer_use_order_of_appearance(tmp_path, capsys):
    recs = records({0: 4, 1: 3})
    for r in recs:                         # layer 2's logger numbers tokens from 100
        if r["layer"] == 2:
            r["token_index"] += 100
    src = write_jsonl(tmp_path / "log.jsonl", recs)
    status, _, err = run(capsys, src, tmp_path / "bad.parquet", *SHAPES)
    assert status == 2 and "missing" in err     # taken literally, every cell of layer 2 is misplaced
    df, _, rep, out = imported(capsys, tmp_path, [src], *SHAPES, "--token-index", "order")
    assert rep["irregularities"]["renumbered_request_layers"] == 2   # layer 2 in both requests
    assert rep["irregularities"]["renumbered_layers"] == 1
    assert cells(df) == cells_of(records({0: 4, 1: 3}))
    assert "renumbered_layers: 1" in out


def cells_of(recs):
    return {(r["request_id"], r["token_index"], r["layer"]): r["experts"] for r in recs}


def test_one_layer_per_file(tmp_path, capsys):
    recs = records({0: 3, 1: 2})
    for layer in LAYERS:
        write_csv(tmp_path / f"router_L{layer}.csv",
                  [{k: v for k, v in r.items() if k != "layer"} for r in recs if r["layer"] == layer])
    df, _, rep, _ = imported(capsys, tmp_path, [tmp_path], *SHAPES, "--layer-from-filename", r"_L(\d+)\.csv")
    assert rep["files"] == 2 and cells(df) == cells_of(recs)


def test_duplicates_exact_and_conflicting(tmp_path, capsys):
    recs = records({0: 3})
    exact = dict(recs[0])                                   # (0, 0, 1) logged twice, same experts
    conflict = {**recs[3], "experts": [0, 7]}               # (0, 1, 2) logged twice, different experts
    assert recs[3]["experts"] != [0, 7]
    src = write_jsonl(tmp_path / "log.jsonl", recs + [exact, conflict])
    df, _, rep, _ = imported(capsys, tmp_path, [src], *SHAPES, "--on-ragged", "keep")
    irr = rep["irregularities"]
    assert irr["duplicate_records"] == 1
    assert (irr["conflicting_duplicate_cells"], irr["conflicting_duplicate_records"]) == (1, 2)
    assert irr["missing_cells"] == 1                       # the conflicting cell is left out, not guessed
    assert (0, 1, 2) not in cells(df) and len(df) == 5


def test_wrong_expert_count_repeated_experts_and_logger_drops(tmp_path, capsys):
    recs = records({0: 4, 1: 4}, skip={(1, 2, 1)})          # the logger dropped one record
    recs[2]["experts"] = [1, 2, 3]                          # (0, 1, 1): three experts for top-2
    recs[3]["experts"] = [4, 4]                             # (0, 1, 2): one expert twice
    src = write_jsonl(tmp_path / "log.jsonl", recs)
    _, _, rep, _ = imported(capsys, tmp_path, [src], *SHAPES, "--on-ragged", "keep")
    irr = rep["irregularities"]
    assert (irr["wrong_top_k"], irr["repeated_experts"]) == (1, 1)
    assert (irr["missing_cells"], irr["ragged_requests"]) == (3, 2)
    assert rep["rows"] == 16 - 3


# ---------------------------------------------------------------------------------------------
# Ragged requests: refuse, truncate, keep

RAGGED = {(0, 3, 2), (1, 0, 2)}   # request 0 lacks position 3 on layer 2; request 1 lacks position 0


def ragged_log(tmp_path) -> Path:
    return write_jsonl(tmp_path / "log.jsonl", records({0: 6, 1: 3, 2: 4}, skip=RAGGED))


def test_ragged_refused_by_default_with_counts_and_both_options(tmp_path, capsys):
    dest = tmp_path / "out.parquet"
    status, out, err = run(capsys, ragged_log(tmp_path), dest, *SHAPES)
    assert status == 2 and not dest.exists() and out == ""
    assert len(err.strip().splitlines()) == 1
    assert "2 missing (request, token, layer) cells in 2 of 3 requests" in err
    assert "--on-ragged truncate" in err and "--on-ragged keep" in err
    assert "keeps 7 of 13 token positions in 2 requests" in err


def test_truncate_keeps_exactly_the_longest_complete_prefix(tmp_path, capsys):
    df, _, rep, _ = imported(capsys, tmp_path, [ragged_log(tmp_path)], *SHAPES, "--on-ragged", "truncate")
    full = cells_of(records({0: 6, 1: 3, 2: 4}))
    want = {c: e for c, e in full.items() if (c[0] == 0 and c[1] < 3) or c[0] == 2}
    assert cells(df) == want
    irr = rep["irregularities"]
    assert (irr["truncated_requests"], irr["emptied_requests"]) == (1, 1)
    assert irr["truncated_positions"] == (6 - 3) + (3 - 0)
    assert irr["truncated_rows"] == 5 + 5                  # request 0: 3 on layer 1 + 2; request 1: 5
    assert rep["requests"] == 2 and rep["tokens"] == 7
    reqs = load_trace_requests(tmp_path / "out.parquet", _model(8, 2, 3, (0,)))   # no on_ragged needed
    assert [r.experts.shape[0] for r in reqs] == [3, 4]


def test_keep_writes_ragged_rows_unchanged(tmp_path, capsys):
    df, _, rep, out = imported(capsys, tmp_path, [ragged_log(tmp_path)], *SHAPES, "--on-ragged", "keep")
    assert cells(df) == cells_of(records({0: 6, 1: 3, 2: 4}, skip=RAGGED))
    assert rep["irregularities"]["missing_cells"] == 2 and "workload.on_ragged=truncate" in out
    model = _model(8, 2, 3, (0,))
    with pytest.raises(TraceError, match="ragged"):
        load_trace_requests(tmp_path / "out.parquet", model)
    with pytest.warns(UserWarning, match="on_ragged=truncate"):
        assert len(load_trace_requests(tmp_path / "out.parquet", model, on_ragged="truncate")) == 2


# ---------------------------------------------------------------------------------------------
# Hard errors: exit 2, one line, DEST untouched


def _bad_source(tmp_path, kind):
    recs = records({0: 2})
    if kind == "unknown field":
        return write_jsonl(tmp_path / "log.jsonl", recs), ["--fields", "experts=topk"], \
            r"has no field 'topk' .*its fields: request_id, token_index, layer, experts, weights"
    if kind == "expert out of range":
        recs[2]["experts"] = [3, 8]
        return write_jsonl(tmp_path / "log.jsonl", recs), [], \
            r"1 record\(s\) name an expert id outside \[0, 8\).*log.jsonl:3"
    if kind == "layer count":
        for r in recs:
            r["layer"] -= 1                            # MoE layers logged as 0, 1
        return write_jsonl(tmp_path / "log.jsonl", recs), [], \
            r"layers do not match model custom .*layer\(s\) 0 are not MoE layers.*--layer-numbering moe"
    if kind == "empty":
        (tmp_path / "log.csv").write_text("")
        return tmp_path / "log.csv", [], "is empty"
    if kind == "bad json":
        text = "".join(json.dumps(r) + "\n" for r in recs)
        lines = text.splitlines()
        lines[2] = lines[2][:-5]
        (tmp_path / "log.jsonl").write_text("\n".join(lines) + "\n")
        return tmp_path / "log.jsonl", [], r"log.jsonl:3: unreadable JSON"
    if kind == "bad csv":
        src = write_csv(tmp_path / "log.csv", recs)
        lines = src.read_text().splitlines()
        lines[3] += ",extra,cells"
        src.write_text("\n".join(lines) + "\n")
        return src, [], r"log.csv: unreadable CSV .*line 4"
    if kind == "bad cell":
        src = write_csv(tmp_path / "log.csv", recs)
        src.write_text(src.read_text().replace('"[', '"[x', 1))
        return src, [], r"log.csv:2: experts value .* is not a list of integers"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["unknown field", "expert out of range", "layer count", "empty",
                                  "bad json", "bad csv", "bad cell"])
def test_hard_errors_exit_2_with_one_line_and_no_dest(tmp_path, capsys, kind):
    src, extra, pattern = _bad_source(tmp_path, kind)
    dest = tmp_path / "out" / "trace.parquet"
    status, out, err = run(capsys, src, dest, *SHAPES, *extra)
    assert status == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and err.startswith("moesim-trace: error: ")
    import re
    assert re.search(pattern, err), err
    assert not dest.exists() and not dest.parent.exists()


def test_a_failed_import_leaves_an_existing_dest_untouched(tmp_path, capsys):
    dest = tmp_path / "trace.parquet"
    dest.write_bytes(b"previous trace")
    status, _, _ = run(capsys, ragged_log(tmp_path), dest, *SHAPES, "--force")  # past the exists check
    assert status == 2 and dest.read_bytes() == b"previous trace"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["log.jsonl", "trace.parquet"]


def test_catalog_model_supplies_shapes_and_checks_layer_count(tmp_path, capsys):
    # OLMoE-1B-7B: 16 MoE layers, 64 experts, top-8.
    recs = [{"request_id": 0, "token_index": t, "layer": l, "experts": list(range(l, l + 8))}
            for t in range(2) for l in range(16)]
    src = write_jsonl(tmp_path / "log.jsonl", recs)
    _, meta, rep, _ = imported(capsys, tmp_path, [src], "--model", "olmoe_1b_7b")
    assert meta.model == "olmoe_1b_7b" and rep["rows"] == 32
    status, _, err = run(capsys, write_jsonl(tmp_path / "short.jsonl", [r for r in recs if r["layer"] < 15]),
                         tmp_path / "x.parquet", "--model", "olmoe_1b_7b")
    assert status == 2 and "MoE layer(s) 15 have no record" in err


# ---------------------------------------------------------------------------------------------
# The real MoELens traces (../shared/traces)

needs_traces = pytest.mark.skipif(not DEEPSEEK.is_dir(), reason="../shared/traces is not present")


@needs_traces
def test_moelens_deepseek_import_matches_the_json_and_replays(tmp_path, capsys):
    df, meta, rep, _ = imported(capsys, tmp_path, [DEEPSEEK], "--model", "deepseek_moe_16b")
    prompts = sorted(DEEPSEEK.glob("prompt-*.json"), key=lambda p: int(p.stem.split("-")[1]))
    assert len(prompts) == 10 and rep["files"] == 10
    assert rep["requests"] == 10 and rep["layers"] == 27
    # SOURCES.md says 92 tokens; the shared files hold 87 (prompts of 5..12 tokens).
    assert rep["tokens"] == 87 and rep["rows"] == 27 * 87 and rep["prefill_tokens"] == 87
    assert sum(rep["irregularities"].values()) == 0
    assert (meta.model, meta.num_experts, meta.top_k, meta.moe_layers) == \
        ("deepseek_moe_16b", 64, 6, tuple(range(1, 28)))
    assert set(df.phase) == {"prefill"}
    got = cells(df)
    for req, layer_i, tok_i in [(0, 1, 0), (3, 5, 2), (4, 27, 11), (9, 14, 8)]:  # 4 = prompt-4.json, 12 tokens
        doc = json.loads(prompts[req].read_text())
        entry = next(e for e in doc["layers"] if e["layer"] == layer_i)["tokens"][tok_i]
        assert got[(req, entry["token_index"], layer_i)] == entry["top_experts"]
        row = df[(df.request_id == req) & (df.token_index == entry["token_index"]) & (df.layer == layer_i)]
        assert np.allclose(list(row.weights.iloc[0]), entry["top_weights"], rtol=1e-6)

    from sim.config import compose_scenario
    from sim.engine import simulate
    res = simulate(compose_scenario(["model=deepseek_moe_16b", "workload=trace",
                                     f"workload.path={tmp_path / 'out.parquet'}", "sim.progress=false"]))
    assert len(res.requests) == 10
    assert sorted(res.requests.prompt_len) == sorted(len(json.loads(p.read_text())["tokens"]) for p in prompts)


@needs_traces
def test_moelens_jetmoe_maps_to_the_catalog_and_a_wrong_model_is_one_line(tmp_path, capsys):
    _, meta, rep, out = imported(capsys, tmp_path, [JETMOE / "prompt-3.json"])
    assert (meta.model, meta.num_experts, meta.top_k, meta.moe_layers) == ("jetmoe_8b", 8, 2, tuple(range(24)))
    assert (rep["requests"], rep["tokens"], rep["rows"]) == (1, 5, 5 * 24)
    assert "attention_routing" in out
    dest = tmp_path / "wrong.parquet"
    status, _, err = run(capsys, JETMOE, dest, "--model", "deepseek_moe_16b")
    assert status == 2 and len(err.strip().splitlines()) == 1 and not dest.exists()
    assert "num_experts=8; --model deepseek_moe_16b has num_experts=64" in err
