"""The one place that decides whether an output may be written, and writes it atomically.

:func:`check_output` refuses an output that is, contains or lies inside any input (symlinks resolved, with or
without ``--overwrite``), refuses a used output without ``overwrite``, and records what the output path held
(:class:`OutputState`). :class:`AtomicOutput` writes into a hidden temporary sibling, marked as lorafuse's, and
:meth:`AtomicOutput.commit` renames it into place only while the output path still holds exactly what was
checked: something that appeared or changed meanwhile (a file a user put there, another merge into the same
path) is never replaced. Then the commit fails with an :class:`OutputError`, and this run's finished output is
removed (a hidden temporary nobody looks for would only be litter). Temporaries of processes that died (SIGKILL)
are removed by the next run into the same output. Errors while writing (disk full, read-only disk, no
permission) become one-line :class:`OutputError` s naming the path, the system's reason and the fix.
"""

from __future__ import annotations

import ctypes
import errno
import json
import logging
import os
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path

from ..errors import LorafuseError, OutputError

log = logging.getLogger("lorafuse")

TMP_TAG = "lorafuse-tmp"  # .OUT.lorafuse-tmp-PID: this run's output while it is written
OLD_TAG = "lorafuse-old"  # .OUT.lorafuse-old-PID: what --overwrite replaces, moved aside for the final rename
MARKER = ".lorafuse-temporary"  # inside both: who made the folder (so only lorafuse's own are ever removed)
SKIPPED_DIRS = {".git"}  # not part of a model: never read as an input
MAX_WALK = 100_000  # entries looked at for links inside one input folder (a model has a few hundred at most)

# What the system says -> what the user can do about it.
FIXES = {
    errno.ENOSPC: "free some space on that disk or choose a folder on another one",
    errno.EDQUOT: "free some of your disk quota or choose a folder on another disk",
    errno.EROFS: "choose a folder on a writable disk",
    errno.EACCES: "choose a folder you may write to (or fix its permissions)",
    errno.EPERM: "choose a folder you may write to (or fix its permissions)",
    errno.EFBIG: "choose a smaller --max-shard-size or a folder on another file system",
    errno.ENAMETOOLONG: "choose a shorter path",
    errno.ENOTDIR: "a parent folder is a file: choose another path",
}
WRITE_ERRNOS = set(FIXES) | {errno.EIO}
# Reasons only a write can have: the output's fault even when the error names the file being copied (shutil).
WRITE_ONLY_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG}


def _is_output_path(name: Path, output: Path) -> bool:
    """``name`` is the output, one of its parents, or inside the output or its temporaries."""
    hidden = f".{output.name}.lorafuse-"
    return (
        name == output
        or name in output.parents
        or any(p == output or p.name.startswith(hidden) for p in (name, *name.parents))
    )


def describe_os_error(exc: OSError, output: Path, what: str = "the output") -> str:
    """One line for an OSError raised while writing ``output``: the path, the system's reason, the fix."""
    output = Path(output).absolute()
    reason = exc.strerror or str(exc)
    code = errno.errorcode.get(exc.errno or 0)
    reason = f"{reason} ({code})" if code else reason
    name = Path(os.fsdecode(exc.filename)).absolute() if exc.filename else None
    read_error = name is not None and not _is_output_path(name, output) and exc.errno not in WRITE_ONLY_ERRNOS
    if read_error:  # an input that could not be read
        return f"{name}: {reason}; {what} {output} was not written"
    fix = FIXES.get(exc.errno or 0, "check the output location")
    where = f" ({name})" if name is not None and name in output.parents else ""  # the parent at fault
    return f"cannot write {what} {output}{where}: {reason}: {fix}"


def _write_error(exc: BaseException) -> OSError | None:
    """The OSError behind ``exc`` when it is a failure to write (EPIPE is not: stdout closed early)."""
    for candidate in (exc, exc.__cause__, exc.__context__):
        if isinstance(candidate, OSError) and not isinstance(candidate, BrokenPipeError):
            if candidate is exc or candidate.errno in WRITE_ERRNOS:
                return candidate
    return None


def save_torch_file(obj: object, path: Path) -> None:
    """``torch.save`` to ``path`` through a Python file, so that a full disk is an OSError and not torch's
    ``RuntimeError: ... unexpected pos`` (which names neither the file nor the reason)."""
    import torch

    with open(path, "wb") as handle:
        try:
            torch.save(obj, handle)
        except RuntimeError as exc:
            if isinstance(exc.__context__, OSError):
                raise exc.__context__ from None
            raise


# --- which paths an output may not touch -------------------------------------------------------------------


def _real(path: str | Path) -> Path:
    """``path`` with every symlink resolved (never raises: Path.resolve does on a symlink loop)."""
    return Path(os.path.realpath(path))


def _input_paths(inputs: list[Path]) -> list[tuple[Path, str]]:
    """Every resolved input path with a description: each input, and every link target inside input folders."""
    found: list[tuple[Path, str]] = []
    for given in inputs:
        root = _real(given)
        found.append((root, f"the input {'folder' if root.is_dir() else 'file'} {root}"))
        if not root.is_dir():
            continue
        seen = 0
        for folder, dirs, files in os.walk(root):
            dirs[:] = [d for d in dirs if d not in SKIPPED_DIRS]
            seen += len(dirs) + len(files)
            if seen > MAX_WALK:  # not a model folder (the command refuses it); do not walk a whole disk first
                break
            for name in [*dirs, *files]:
                entry = Path(folder) / name
                if entry.is_symlink():
                    real = _real(entry)
                    found.append((real, f"{real} (linked from the input {entry})"))
    return found


def refuse_overlap(output: str | Path, inputs: list[Path], what: str = "output") -> None:
    """Refuse an output (``what``) that is, contains or lies inside any input (files inside input folders too)."""
    out = _real(output)
    for path, desc in _input_paths(inputs):
        if out == path or path.is_relative_to(out):
            raise OutputError(f"{what} {out} would overwrite {desc}: choose a path outside every input")
        if out.is_relative_to(path):
            raise OutputError(f"{what} {out} lies inside {desc}: choose a path outside every input")


# --- what the output path holds -----------------------------------------------------------------------------


@dataclass(frozen=True)
class OutputState:
    """What the output path held when it was checked: ``absent``, ``empty`` (an empty folder) or ``existing``
    (what ``--overwrite`` allowed to replace; ``identity`` tells it from anything put there later)."""

    path: Path
    kind: str
    identity: tuple | None = None


def _identity(path: Path) -> tuple | None:
    """(device, inode, type, mtime, size or folder listing or link target) of ``path`` itself; None if absent."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    if os.path.islink(path):
        content: object = os.readlink(path)
    elif os.path.isdir(path):
        content = tuple(sorted(os.listdir(path)))
    else:
        content = st.st_size
    return (st.st_dev, st.st_ino, st.st_mode >> 12, st.st_mtime_ns, content)


def _same_thing(a: tuple | None, b: tuple | None) -> bool:
    """Same file or folder with the same contents; mtime left out (moving a folder may touch it)."""
    return a is not None and b is not None and a[:3] == b[:3] and a[4] == b[4]


def output_state(path: Path) -> OutputState:
    """Record what ``path`` holds now (the state :meth:`AtomicOutput.commit` compares with)."""
    path = Path(path).absolute()
    identity = _identity(path)
    if identity is None:
        return OutputState(path, "absent")
    if not path.is_symlink() and path.is_dir() and not identity[4]:
        return OutputState(path, "empty", identity)
    return OutputState(path, "existing", identity)


def _check_parent(output: Path) -> None:
    """Refuse early (before any work) an output whose nearest existing parent cannot be written."""
    parent = output.parent
    while not parent.exists() and not parent.is_symlink():
        parent = parent.parent
    if not parent.is_dir():
        raise OutputError(f"cannot write the output {output}: {parent} is a file: choose another output path")
    if os.access(parent, os.W_OK | os.X_OK):
        return
    read_only = os.statvfs(parent).f_flag & os.ST_RDONLY
    code = errno.EROFS if read_only else errno.EACCES
    raise OSError(code, os.strerror(code), str(parent))


def check_output(output: str | Path, overwrite: bool, inputs: list[Path]) -> OutputState:
    """Refuse an output that would destroy an input or a user's data; return what the output path holds.

    Pass the returned state to :class:`AtomicOutput` so that its commit replaces only that. Also removes the
    temporaries that dead lorafuse processes left for this output.
    """
    refuse_overlap(output, inputs)
    path = Path(output).absolute()
    try:
        _check_parent(path)
        remove_stale_temporaries(path)
    except OSError as exc:
        raise OutputError(describe_os_error(exc, path)) from exc
    state = output_state(path)
    if state.kind == "existing" and not overwrite:
        if path.is_symlink():
            raise OutputError(
                f"output {path} is a symbolic link: choose a new path or pass --overwrite to replace the link "
                "(its target is kept)"
            )
        kind = "folder" if path.is_dir() else "file"
        raise OutputError(f"output {kind} {path} exists and is not empty: choose a new path or pass --overwrite")
    return state


# --- temporaries left by dead processes ---------------------------------------------------------------------


def _stat_fields(pid: int) -> list[str] | None:
    """The fields of ``/proc/PID/stat`` after the command name (field 3, the state, first), or None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[-1].split()


def _start_time(pid: int) -> str | None:
    """The start time of process ``pid`` (Linux /proc), to tell a reused PID from the process that wrote."""
    fields = _stat_fields(pid)
    return fields[19] if fields else None  # field 22 (starttime)


def _marker_text() -> str:
    pid = os.getpid()
    return json.dumps({"pid": pid, "host": socket.gethostname(), "start": _start_time(pid)}) + "\n"


def _owner_is_dead(folder: Path) -> bool:
    """True only for a folder lorafuse marked, on this host, whose process is gone."""
    try:
        owner = json.loads((folder / MARKER).read_text())
        pid, host, start = int(owner["pid"]), owner["host"], owner.get("start")
    except (OSError, ValueError, KeyError, TypeError):
        return False  # not ours, or unreadable: never removed
    if host != socket.gethostname() or pid == os.getpid():
        return False  # another machine's process (shared disk) cannot be checked from here
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # alive, another user's
    fields = _stat_fields(pid)
    if fields and fields[0] in ("Z", "X"):  # killed, not yet reaped by its parent (a pool's or Ray's worker)
        return True
    return start is not None and _start_time(pid) not in (None, start)  # the PID now names another process


def remove_stale_temporaries(output: Path) -> None:
    """Remove the temporaries of dead lorafuse processes for ``output``; put back an output such a process had
    moved aside and not replaced (it died between the two renames of a commit)."""
    output = Path(output).absolute()
    parent = output.parent
    if not parent.is_dir():
        return
    for tag in (TMP_TAG, OLD_TAG):
        prefix = f".{output.name}.{tag}-"
        for entry in parent.iterdir():
            if not entry.name.startswith(prefix) or not entry.name[len(prefix) :].isdigit():
                continue
            if entry.is_symlink() or not entry.is_dir() or not _owner_is_dead(entry):
                continue
            moved = entry / output.name
            if tag == OLD_TAG and (moved.exists() or moved.is_symlink()) and not os.path.lexists(output):
                os.rename(moved, output)
                log.warning(f"put back {output}, which an interrupted lorafuse run had moved to {entry}")
            shutil.rmtree(entry)
            log.warning(f"removed {entry}, left by an interrupted lorafuse run")


# --- atomic writing -----------------------------------------------------------------------------------------


def _renameat2_noreplace(src: Path, dst: Path) -> bool:
    """rename(2) that fails with EEXIST instead of replacing ``dst``; False where the system has none."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_noreplace = -100, 1
    if renameat2(at_fdcwd, os.fsencode(src), at_fdcwd, os.fsencode(dst), rename_noreplace) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
        return False  # this file system cannot do it
    raise OSError(code, os.strerror(code), str(dst))


def rename_noreplace(src: Path, dst: Path) -> None:
    """Rename ``src`` to ``dst``, raising FileExistsError (never replacing) when something is at ``dst``."""
    if _renameat2_noreplace(src, dst):
        return
    if not src.is_dir():
        try:  # a hard link fails if dst exists: as atomic as renameat2
            os.link(src, dst)
            os.unlink(src)
            return
        except FileExistsError:
            raise
        except OSError:
            pass  # no hard links on this file system
    if os.path.lexists(dst):  # last resort: a check just before the rename
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst))
    os.rename(src, dst)


def make_parents(folder: Path) -> list[Path]:
    """Create ``folder`` and its missing parents; returns those created, deepest first."""
    missing: list[Path] = []
    while not folder.exists() and not folder.is_symlink():
        missing.append(folder)
        folder = folder.parent
    for path in reversed(missing):
        path.mkdir(exist_ok=True)
    return missing


def remove_parents(made: list[Path]) -> None:
    """Remove the parents we created, deepest first, while they are empty (never anything else)."""
    for path in made:
        try:
            path.rmdir()
        except FileNotFoundError:
            continue
        except OSError:
            return  # not empty (something else is in it now): it and its parents stay


class AtomicOutput:
    """A temporary sibling of ``final`` that becomes ``final`` on :meth:`commit`.

    The temporary is the folder ``.NAME.lorafuse-tmp-PID`` (holding a marker file until the commit); for a file
    output (``is_dir=False``) :attr:`tmp` is the file ``NAME`` inside it. ``checked`` is what
    :func:`check_output` found at ``final``; without it, what is there now. As a context manager, any failure
    removes the temporary (and the parents it created) and OSErrors become one-line :class:`OutputError` s.
    """

    def __init__(self, final: Path, is_dir: bool = True, adopt: bool = False, checked: OutputState | None = None):
        """``adopt``: keep a temporary folder this process already started (the CLI's prefill, prefill.py)."""
        self.final = Path(final).absolute()
        self.is_dir = is_dir
        self.checked = checked if checked is not None else output_state(self.final)
        self.work = self.final.parent / f".{self.final.name}.{TMP_TAG}-{os.getpid()}"
        self.tmp = self.work if is_dir else self.work / self.final.name
        self._made: list[Path] = []
        self._done = False
        if adopt and is_dir and self.work.is_dir() and not self.work.is_symlink() and (self.work / MARKER).is_file():
            return
        try:
            remove_stale_temporaries(self.final)
            self._made = make_parents(self.final.parent)
            self.remove(self.work)
            self.work.mkdir()
            (self.work / MARKER).write_text(_marker_text())
        except OSError as exc:
            self.abort()
            raise OutputError(describe_os_error(exc, self.final)) from exc

    @staticmethod
    def remove(path: Path) -> None:
        """Remove a file or folder tree (a symlink itself, never its target)."""
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()

    def _changed(self, what: str) -> OutputError:
        return OutputError(
            f"{self.final} {what} while lorafuse was writing it (another run into the same output?): nothing was "
            "replaced and this run's output was removed; check what is there now and run again"
        )

    def commit(self) -> Path:
        """Move the finished output into place, replacing only what was there when the output was checked."""
        try:
            (self.work / MARKER).unlink(missing_ok=True)
            if self.checked.kind == "existing":
                self._replace()
            elif self.checked.kind == "empty" and self.is_dir:
                try:  # rename(2) replaces an empty folder and fails on one that has gained files
                    os.rename(self.work, self.final)
                except OSError as exc:
                    if exc.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
                        raise self._changed("gained files") from exc
                    raise
            else:
                self._rename_new()
            if not self.is_dir:
                shutil.rmtree(self.work)
        except OSError as exc:
            raise OutputError(describe_os_error(exc, self.final)) from exc
        self._done = True
        return self.final

    def _rename_new(self) -> None:
        """The output path was absent (or an empty folder, for a file output): take it only if it still is."""
        if self.checked.kind == "empty":
            try:
                os.rmdir(self.final)
            except FileNotFoundError:
                pass
            except OSError as exc:
                raise self._changed("changed") from exc
        try:
            rename_noreplace(self.tmp, self.final)
        except FileExistsError as exc:
            raise self._changed("appeared") from exc

    def _replace(self) -> None:
        """Replace what --overwrite allowed to replace, if it is still exactly that: move it aside, check it
        again where nobody writes, rename ours into place, then delete it."""
        if _identity(self.final) != self.checked.identity:
            raise self._changed("changed")
        aside = self.final.parent / f".{self.final.name}.{OLD_TAG}-{os.getpid()}"
        self.remove(aside)
        aside.mkdir()
        (aside / MARKER).write_text(_marker_text())
        old = aside / self.final.name
        try:
            os.rename(self.final, old)
        except FileNotFoundError as exc:
            shutil.rmtree(aside)
            raise self._changed("was removed") from exc
        if not _same_thing(_identity(old), self.checked.identity):  # changed in the instant before the move
            try:
                rename_noreplace(old, self.final)
                shutil.rmtree(aside)
            except OSError:
                log.warning(f"{self.final} changed while it was being replaced: it was moved to {old}")
            raise self._changed("changed")
        try:
            rename_noreplace(self.tmp, self.final)
        except FileExistsError as exc:
            shutil.rmtree(aside)  # what --overwrite allowed to replace; another run's output now holds the path
            raise self._changed("appeared again") from exc
        shutil.rmtree(aside)

    def abort(self) -> None:
        """Remove the temporary and the parents this output created."""
        if not self._done:
            self.remove(self.work)
            remove_parents(self._made)

    def __enter__(self) -> AtomicOutput:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.abort()  # after a failure, or when the block ended without a commit: nothing may look like an output
        if not isinstance(exc, Exception) or (isinstance(exc, LorafuseError) and type(exc) is not LorafuseError):
            return  # no failure, an interrupt, or a typed error that already says what is wrong
        cause = _write_error(exc)
        if cause is not None:
            raise OutputError(describe_os_error(cause, self.final)) from exc
