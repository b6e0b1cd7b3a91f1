"""``MoesimSweeper``: Hydra's basic sweeper, made so that a sweep loses nothing.

Selected by ``conf/config.yaml`` (``override hydra/sweeper: moesim``; node in
``conf/hydra/sweeper/moesim.yaml``); ``hydra/sweeper=basic`` on the command line gets Hydra's own.
It expands sweeps exactly as the basic sweeper does (comma lists, ``range()``, ``choice()``, the
cartesian product, ``hydra.sweeper.params`` from experiment presets, ``max_batch_size``) and
works with any launcher (basic, joblib, submitit local/SLURM, Ray). What it adds:

1. **Every point is checked before the first one runs.** Each point of every job batch is
   composed (``config_loader.load_sweep_config``) and type-checked the way ``moesim`` would
   (:func:`sim.cli.check_point`: ``build_scenario``, plus a router trace's header for
   ``workload=trace``). If any point is bad, each bad point gets one line on stderr,
   ``moesim: error: point N (OVERRIDES): MESSAGE`` (N is the job number, i.e. the directory name;
   OVERRIDES are the keys that vary across the sweep), and the sweep exits with status 2 before
   the sweep directory exists. Checking costs one config composition per point (a few ms each).
2. **``sweep_points.json``** in the sweep directory lists every point (job number, directory
   relative to the sweep directory, overrides) before any runs, so ``moesim-report`` can name the
   points that never produced a result.
3. **A failing point does not stop the others.** Inside a sweep the task function records a
   failure in the point's directory (``summary.json`` with ``"status": "failed"``, ``error.txt``
   with the traceback) and returns normally (no ``sys.exit``, which would end the basic
   launcher's loop and break joblib's workers). If the launcher itself dies (a killed worker:
   loky's ``TerminatedWorkerError``, a submitit job that died, a Ray worker lost), the points of
   that batch without a result are launched again, one at a time, through the same launcher; a
   point whose worker dies again is recorded as failed (``error_type`` ``WorkerDied``). After the
   sweep, each failed point gets one line on stderr and the exit status is 1.

Ctrl-C is not caught here: it ends the sweep (``moesim`` exits 130); points not run stay listed
in ``sweep_points.json`` and ``moesim-report`` shows them as missing.
"""

from __future__ import annotations

import itertools
import json
import logging
import re
import sys
import traceback
from pathlib import Path
from typing import Any, List, Optional, Sequence

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.utils import JobReturn, JobStatus, filter_overrides
from omegaconf import DictConfig, OmegaConf, open_dict

log = logging.getLogger(__name__)

POINTS_FILE = "sweep_points.json"
EXIT_BAD_INPUT = 2
EXIT_FAILED = 1


def _one_line(exc: BaseException) -> str:
    """An exception's message on one line: its first paragraph, without the indented details
    (Hydra's composition errors run over several lines: what failed, a hint, OmegaConf's key dump)."""
    kept = []
    for line in str(exc).splitlines():
        if not line.strip():
            if kept:
                break
            continue
        if line[:1].isspace() and kept:
            break
        kept.append(line.strip())
    return " ".join(kept) if kept else type(exc).__name__


def _died(exc: BaseException) -> str:
    """A launcher's "a worker died" exception, short: its type and the exit codes where it says."""
    codes = re.search(r"exit codes? of the workers? (?:are|is) (\{[^}]*\})", str(exc))
    if codes:
        return f"{type(exc).__name__}, exit codes {codes.group(1)}"
    text = _one_line(exc)
    return f"{type(exc).__name__}: {text if len(text) <= 160 else text[:157] + '...'}"


def _message(exc: BaseException) -> str:
    from workloads.validation import ConfigError
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    if isinstance(exc, (ConfigError, HydraException, OmegaConfBaseException)):
        return _one_line(exc)
    return f"{type(exc).__name__}: {_one_line(exc)}"


class MoesimSweeper(BasicSweeper):
    """Hydra's ``BasicSweeper`` that validates every point first and survives failing points."""

    def __init__(self, max_batch_size: Optional[int] = None, params: Optional[dict] = None) -> None:
        super().__init__(max_batch_size=max_batch_size, params=params)
        self.points: list[dict] = []

    # -- expanding and checking ------------------------------------------------------------
    def _label(self, overrides: Sequence[str], varying: set) -> str:
        shown = filter_overrides(list(overrides))
        picked = [o for o in shown if o.split("=", 1)[0] in varying]
        return " ".join(picked or shown)

    def _compose(self, num: int, overrides: Sequence[str]) -> DictConfig:
        """The point's full config (with ``hydra``), job number set as the launchers set it."""
        assert self.hydra_context is not None and self.config is not None
        cfg = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
        with open_dict(cfg):
            cfg.hydra.job.id = num
            cfg.hydra.job.num = num
        return cfg

    def _job_dir(self, cfg: DictConfig) -> Path:
        hc = HydraConfig.instance()
        saved = hc.cfg
        try:
            hc.set_config(cfg)
            return Path(str(OmegaConf.select(cfg, "hydra.sweep.dir"))) / str(
                OmegaConf.select(cfg, "hydra.sweep.subdir"))
        finally:
            hc.cfg = saved

    def _expand(self, arguments: List[str]) -> None:
        from sim import cli

        assert self.hydra_context is not None
        params_conf = self._parse_config()
        params_conf.extend(arguments)
        try:
            parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
            overrides = parser.parse_overrides(params_conf)
            self.overrides = self.split_arguments(overrides, self.max_batch_size)
        except Exception as exc:  # a malformed hydra.sweeper.params entry of a preset
            cli.fail(f"sweep: {_message(exc)}")
        all_points = [list(p) for p in itertools.chain.from_iterable(self.overrides)]
        values: dict[str, set] = {}
        for point in all_points:
            for o in filter_overrides(point):
                key, _, value = o.partition("=")
                values.setdefault(key, set()).add(value)
        varying = {k for k, v in values.items() if len(v) > 1}
        self.points, bad = [], []
        for num, point in enumerate(all_points):
            entry = {"num": num, "overrides": point, "label": self._label(point, varying), "dir": None}
            try:
                cli.check_group_overrides(point)
                cfg = self._compose(num, point)
                entry["dir"] = self._job_dir(cfg)
                cli.check_point(cfg)
            except Exception as exc:
                bad.append(f"point {num} ({entry['label']}): {_message(exc)}")
            self.points.append(entry)
        if bad:
            for line in bad:
                print(f"moesim: error: {line}", file=sys.stderr)
            sys.stderr.flush()
            raise SystemExit(EXIT_BAD_INPUT)

    def _write_points(self, sweep_dir: Path) -> None:
        from workloads.io import atomic_write

        def rel(p: Optional[Path]) -> Optional[str]:
            if p is None:
                return None
            try:
                return str(p.resolve().relative_to(sweep_dir.resolve()))
            except ValueError:
                return str(p.resolve())

        doc = {"points": [{"num": p["num"], "dir": rel(p["dir"]), "overrides": filter_overrides(p["overrides"])}
                          for p in self.points]}
        atomic_write(sweep_dir / POINTS_FILE, lambda t: t.write_text(json.dumps(doc, indent=1) + "\n"))

    # -- running -----------------------------------------------------------------------------
    def _outcome_of(self, ret: JobReturn, point: dict) -> dict:
        """status/error of one launched point from its JobReturn."""
        from sim import cli

        if ret.status == JobStatus.COMPLETED:
            value = ret._return_value
            if isinstance(value, dict) and "status" in value:
                return value
            return {"status": "ok"}
        exc = ret._return_value
        detail = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)) \
            if isinstance(exc, BaseException) else str(exc)
        return cli.record_failure(point["dir"], type(exc).__name__, _one_line(exc), detail)

    def _relaunch(self, point: dict, why: BaseException) -> dict:
        """Run one point again on its own; if its worker dies again, record it as failed."""
        from sim import cli

        assert self.launcher is not None
        try:
            (ret,) = self.launcher.launch([point["overrides"]], initial_job_idx=point["num"])
        except Exception as exc:
            return cli.record_failure(
                point["dir"], "WorkerDied", f"the process running this point died ({_died(exc)})",
                f"The launcher lost this point's process, in the sweep and again when the point ran on "
                f"its own.\n\nin the sweep: {type(why).__name__}: {why}\n\non its own: "
                f"{type(exc).__name__}: {exc}")
        done = cli.point_result(point["dir"])
        return done if done is not None else self._outcome_of(ret, point)

    def _launch_batch(self, batch: Sequence[Sequence[str]], first: int) -> list[dict]:
        from sim import cli

        assert self.launcher is not None
        points = self.points[first:first + len(batch)]
        try:
            results = self.launcher.launch(batch, initial_job_idx=first)
        except Exception as exc:
            print(f"moesim: warning: the launcher stopped ({_died(exc)}); "
                  f"running the points it left without a result again, one at a time", file=sys.stderr)
            outcomes = []
            for point in points:
                done = cli.point_result(point["dir"])
                if done is None:
                    cli.clean_partial(point["dir"])
                    done = self._relaunch(point, exc)
                outcomes.append(done)
            return outcomes
        return [self._outcome_of(r, p) for r, p in zip(results, points)]

    def sweep(self, arguments: List[str]) -> Any:
        assert self.config is not None and self.launcher is not None and self.hydra_context is not None
        self._expand(arguments)
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
        self._write_points(sweep_dir)

        outcomes: list[dict] = []
        first = 0
        while not self.is_done():
            batch = self.get_job_batch()
            outcomes += self._launch_batch(batch, first)
            first += len(batch)

        failed = [(p, o) for p, o in zip(self.points, outcomes) if o.get("status") != "ok"]
        for point, outcome in failed:
            where = f"; see {point['dir'] / 'error.txt'}" if point["dir"] is not None else ""
            print(f"moesim: error: point {point['num']} ({point['label']}) failed: "
                  f"{outcome.get('error_type', 'Error')}: {outcome.get('error', '')}{where}", file=sys.stderr)
        if failed:
            sys.stderr.flush()
            raise SystemExit(EXIT_FAILED)
        return outcomes
