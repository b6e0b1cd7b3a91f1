"""Shared fixtures, and how the suite runs in parallel (pytest-xdist: ``pytest -n 2 --dist loadgroup``).

* ``built_once``: a directory an expensive fixture (a cost-table profile) builds once per test
  session, shared by every xdist worker: the first worker to ask builds it under a file lock, the
  others wait for it and reuse it. Without xdist it is simply built once.
* Tests of a module that use one of that module's own module- or session-scoped fixtures are put
  in one ``xdist_group`` (named after the module), so that with ``--dist loadgroup`` one worker
  runs them all and builds the fixture once, instead of each worker building its own copy.
  Other tests are scheduled one by one.
* Hypothesis runs without its wall-clock limits (below).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
from pathlib import Path
from typing import Callable, Iterator

import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"

# Hypothesis: no wall-clock limits (its per-example deadline, the too_slow health check on data
# generation) -- they fail on a busy machine, and speed is not what these tests check. Tests'
# own @settings(...) inherit these defaults.
try:
    from hypothesis import HealthCheck, settings as _hypothesis_settings
except ImportError:   # pragma: no cover -- hypothesis is a test dependency
    pass
else:
    _hypothesis_settings.register_profile("moesim", deadline=None, suppress_health_check=[HealthCheck.too_slow])
    _hypothesis_settings.load_profile("moesim")


@pytest.fixture
def load_script():
    """Import ``scripts/NAME.py`` (not a package) by path: ``load_script("moesd_plot")``."""
    def load(name: str):
        spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod
    return load


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock on ``path`` (created if missing), across processes."""
    try:
        import fcntl
    except ImportError:   # not POSIX: the filelock package, if installed
        from filelock import FileLock

        with FileLock(str(path)):
            yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@pytest.fixture(scope="session")
def built_once(tmp_path_factory) -> Callable[[str, Callable[[Path], None]], Path]:
    """``built_once(name, build)``: the directory ``build(path)`` fills, built once per session.

    Under xdist every worker has its own base temporary directory inside the session's one
    (``getbasetemp().parent``), which they share; the directory lives there. A build that fails
    leaves no completion mark, so the next test that asks builds it again (and fails the same way)."""
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent
    root = base / "built-once"
    root.mkdir(exist_ok=True)

    def get(name: str, build: Callable[[Path], None]) -> Path:
        d, done = root / name, root / f"{name}.complete"
        with _locked(root / f"{name}.lock"):
            if not done.is_file():
                if d.exists():
                    shutil.rmtree(d)
                build(d)
                done.touch()
        return d

    return get


def pytest_configure(config):
    # pytest-xdist registers it too; without xdist (or with -p no:xdist) the mark is inert.
    config.addinivalue_line("markers", "xdist_group(name): run in the same xdist worker (--dist loadgroup)")


@pytest.hookimpl(tryfirst=True)   # before xdist reads the xdist_group marks (--dist loadgroup)
def pytest_collection_modifyitems(config, items):
    for item in items:
        info = getattr(item, "_fixtureinfo", None)
        if info is None:
            continue
        module = item.nodeid.split("::", 1)[0]
        for name in info.names_closure:
            defs = info.name2fixturedefs.get(name) or ()
            if defs and defs[-1].scope in ("module", "session") and defs[-1].baseid == module:
                item.add_marker(pytest.mark.xdist_group(module))
                break
