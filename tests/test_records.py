"""Records as columns (sim.records): the same frames, files and summary as pandas gave, without pandas."""

import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from sim.config import compose_scenario
from sim.engine import simulate
from sim.metrics import summarize
from sim.records import Records
from workloads.requests import build_requests


@pytest.fixture(scope="module")
def spec_run():
    sc = compose_scenario(["model=mixtral_8x7b", "policy/speculation=static", "workload.batch_size=2",
                           "workload.num_requests=3", "workload.output_len=12", "sim.progress=false"])
    return simulate(sc, build_requests(sc.workload, sc.model, sc.seed))


def test_columns_have_the_types_pandas_infers_from_the_dicts():
    rows = [{"i": 1, "f": 2, "n": None, "s": "decode", "l": [1, 2]},
            {"i": np.int64(3), "f": 0.5, "n": 1.5, "s": "prefill", "l": []}]
    names = ["i", "f", "n", "s", "l"]
    rec = Records.from_rows(rows, names)
    assert rec["i"].dtype == np.int64 and rec["f"].dtype == np.float64 and np.isnan(rec["n"][0])
    pd.testing.assert_frame_equal(rec.frame(), pd.DataFrame(rows, columns=names))
    assert len(rec) == 2 and "s" in rec and "x" not in rec


def test_a_column_of_another_type_is_refused():
    with pytest.raises(TypeError, match="'d'"):
        Records.from_rows([{"d": {"a": 1}}], ["d"])


def test_parquet_reads_back_as_the_frame(spec_run, tmp_path):
    for records, frame in ((spec_run.step_records, spec_run.steps), (spec_run.request_records, spec_run.requests)):
        path = tmp_path / "r.parquet"
        records.write_parquet(path)
        back = pd.read_parquet(path)
        assert len(back) == len(frame) > 0
        pd.testing.assert_frame_equal(back, frame, check_dtype=False)   # pyarrow may read str as object
        assert [str(d) for d in back.dtypes if str(d) in ("int64", "float64")] == \
            [str(d) for d in frame.dtypes if str(d) in ("int64", "float64")]


def test_the_summary_is_the_same_from_columns_and_from_frames(spec_run):
    from_columns = summarize(spec_run.step_records, spec_run.request_records)
    from_frames = summarize(spec_run.steps, spec_run.requests)
    assert from_columns == from_frames
    assert from_columns["spec_rounds"] > 0   # the speculative keys are there


def test_a_tiny_run_never_imports_pandas(tmp_path):
    probe = ("import atexit, runpy, sys\n"
             "atexit.register(lambda: print('PANDAS', 'pandas' in sys.modules))\n"
             f"sys.argv = ['moesim', 'workload.num_requests=1', 'workload.output_len=2', 'hydra.run.dir={tmp_path}']\n"
             "runpy.run_module('sim.cli', run_name='__main__')\n")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert "PANDAS False" in out
    assert len(pd.read_parquet(tmp_path / "steps.parquet")) > 0
