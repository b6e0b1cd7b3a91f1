"""Writing files: nothing half-written is ever left behind, and nothing a user gave is overwritten.

``atomic_write`` writes a file through a temporary name and a rename, with the permissions
``open()`` would give it. ``check_outputs`` is the one rule every ``moesim-*`` command that writes
files applies to its command line before it does any work (see its docstring).
"""

from __future__ import annotations

import os
import tempfile
from fnmatch import fnmatch
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence, Union

from .validation import ConfigError

PathLike = Union[str, os.PathLike]
#: an output or input as given to :func:`check_outputs`: a path, or ``(label, path)`` where the
#: label names it on the command line (``"-o"``, ``"--json"``, ``"DEST"``, ``"TRACE"``)
Named = Union[PathLike, tuple]


def current_umask() -> int:
    """The process's umask (read without changing it where /proc allows)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it to ``path``.

    The rename is atomic on one file system: readers see the old file or the complete new one.
    If ``write`` fails, the temporary file is removed and ``path`` is untouched. The file gets the
    permissions ``open(path, "w")`` would give it: an existing file's mode is kept, a new file gets
    ``0o666 & ~umask`` (tempfile's own 0600 is not kept). Missing parent directories are created
    with the usual ``0o777 & ~umask``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        st = path.stat()
        mode = st.st_mode & 0o7777 if path.is_file() else None
    except OSError:
        mode = None
    if mode is None:
        mode = 0o666 & ~current_umask()
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


# ------------------------------------------------------------------------------------------------
# Outputs never replace inputs


def _named(items: Optional[Iterable[Named]], default: str) -> list[tuple[str, Path]]:
    out = []
    for item in items or ():
        if isinstance(item, tuple):
            label, path = item[0], item[1]
        else:
            label, path = default, item
        if path is None or str(path) == "":
            continue
        out.append((str(label), Path(path)))
    return out


def _show(label: str, path: Path) -> str:
    return f"{label} {path}" if label else str(path)


def _resolved(path: Path) -> Path:
    try:
        return path.expanduser().resolve()
    except (OSError, RuntimeError):  # a symlink loop
        return Path(os.path.abspath(path))


def _same(a: Path, b: Path) -> bool:
    """Whether two paths name the same file: equal resolved paths, or ``os.path.samefile`` (hard
    links, bind mounts) when both exist."""
    if _resolved(a) == _resolved(b):
        return True
    try:
        return os.path.samefile(a, b)
    except (OSError, ValueError):
        return False


def _inside(path: Path, folder: Path) -> bool:
    """Whether ``path`` lies (strictly) under the directory ``folder``."""
    p, f = _resolved(path), _resolved(folder)
    return p != f and f in p.parents


def _check_parent(label: str, path: Path) -> None:
    """The nearest existing ancestor of ``path`` must be a writable directory."""
    anc = path.parent if str(path.parent) else Path(".")
    while not anc.exists() and anc != anc.parent:
        if anc.is_symlink():  # dangling link: mkdir would fail
            break
        anc = anc.parent
    if not anc.is_dir():
        raise ConfigError(f"{_show(label, path)} cannot be written: {anc} is not a directory; "
                          f"give a path in an existing or new directory")
    if not os.access(anc, os.W_OK | os.X_OK):
        raise ConfigError(f"{_show(label, path)} cannot be written: directory {anc} is not writable "
                          f"(permission denied); give a path in a writable directory")


def check_outputs(outputs: Iterable[Named] = (), inputs: Iterable[Named] = (), force: bool = False, *,
                  dirs: Sequence[tuple] = (), flag: str = "--force") -> None:
    """Refuse (``ConfigError``, one line) a command line whose outputs would replace what the user gave.

    Call it with everything the command will write and everything it reads, before any work or
    any write starts. ``outputs`` are files, ``inputs`` files or directories (a directory input
    means every file in it is read), each a path or ``(label, path)``; ``dirs`` are directory
    outputs, each ``(label, path)`` or ``(label, path, names)`` with ``names`` the top-level
    entries the command writes into it (glob patterns; None: anything). The rule:

    * an output file is never an input: not the same path once resolved (``./x``, ``a/../x`` and
      symlinks are seen through), not the same file (``os.path.samefile``: hard links), and not an
      existing file inside an input directory -- with or without ``--force``;
    * no two outputs are the same file;
    * an output file that already exists is replaced only with ``--force`` ("OUT exists; pass
      --force to replace it"); ``--force`` never lets an output replace an input;
    * a directory output must be missing or empty unless ``--force`` (which writes into it,
      replacing files of the same names and leaving the others); it is never an input directory
      and never holds an input at a name the command writes, with or without ``--force``;
    * an output file is not an existing directory, a directory output not an existing file, and
      the nearest existing parent of either is a writable directory.
    """
    outs = _named(outputs, "output")
    ins = _named(inputs, "input")
    douts = [(str(d[0]), Path(d[1]), (tuple(d[2]) if len(d) > 2 and d[2] is not None else None))
             for d in dirs if d[1] is not None and str(d[1]) != ""]

    for label, path in outs:
        if path.is_dir():
            raise ConfigError(f"{_show(label, path)} is a directory; give a file name")
        for ilabel, ipath in ins:
            if _same(path, ipath):
                raise ConfigError(f"{_show(label, path)} is the input {_show(ilabel, ipath)}; an output never "
                                  f"replaces an input, name another file")
            if ipath.is_dir() and path.exists() and _inside(path, ipath):
                raise ConfigError(f"{_show(label, path)} is a file in the input directory {_show(ilabel, ipath)}; "
                                  f"an output never replaces an input, name another file")
    for label, path, names in douts:
        if path.exists() and not path.is_dir():
            raise ConfigError(f"{_show(label, path)} is a file; give a directory")
        for ilabel, ipath in ins:
            if _same(path, ipath):
                raise ConfigError(f"{_show(label, path)} is the input {_show(ilabel, ipath)}; an output never "
                                  f"replaces an input, name another directory")
            if _inside(ipath, path):
                top = _resolved(ipath).relative_to(_resolved(path)).parts[0]
                if names is None or any(fnmatch(top, n) for n in names):
                    raise ConfigError(f"{_show(label, path)} holds the input {_show(ilabel, ipath)}, which this "
                                      f"command would replace; name another directory")

    every = [(lbl, p) for lbl, p in outs] + [(lbl, p) for lbl, p, _ in douts]
    for i, (la, pa) in enumerate(every):
        for lb, pb in every[i + 1:]:
            if _same(pa, pb):
                raise ConfigError(f"{_show(la, pa)} and {_show(lb, pb)} are the same file; name two different files")

    for label, path in outs:
        _check_parent(label, path)
    for label, path, _ in douts:
        if not path.exists():
            _check_parent(label, path)

    if force:
        return
    for label, path in outs:
        if path.exists() or path.is_symlink():
            raise ConfigError(f"{_show(label, path)} exists; pass {flag} to replace it")
    for label, path, _ in douts:
        if path.is_dir() and any(True for _ in path.iterdir()):
            raise ConfigError(f"{_show(label, path)} exists and is not empty; pass {flag} to write into it "
                              f"(files of the same names are replaced) or name a new directory")


#: help text of every command's ``--force``
FORCE_HELP = "replace existing output files (never an input: an output naming an input is always refused)"
FORCE_HELP_DIR = ("write into an existing non-empty output directory, replacing files of the same names "
                  "(never an input: an output holding an input it would replace is always refused)")
