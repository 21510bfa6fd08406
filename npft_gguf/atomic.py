"""Outputs appear whole or not at all: written to a temporary beside the target, then put in place.

Every temporary is named `.NAME.npft-PID.KIND` (NAME the output it is for, PID the process that
writes it) and is locked (flock) by that process while it lives. Ctrl-C, SIGTERM (see signals.py)
and errors remove it on the way out; what SIGKILL or a crash leaves, the next run that writes the
same output removes: a temporary whose process is gone and whose lock nobody holds. A live
process's temporaries are never touched.

Without --force the final name is created exclusively (a hard link), so of two runs writing the
same output at once, one wins and the other fails in one line instead of both reporting success.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import stat
import tempfile
from contextlib import contextmanager
from pathlib import Path

from .errors import NpftError, UsageError
from .signals import pause_for_tests

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: the PID alone decides
    fcntl = None

TEMP = re.compile(r"^\.(?P<name>.+)\.npft-(?P<pid>\d+)(?:-\d+)?\.(?P<kind>[a-z0-9]+)$")
DISK_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
NO_HARD_LINKS = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK, errno.ENOSYS}


def check_target(path: Path, force: bool) -> None:
    """Fail before any work when the output cannot or must not be written."""
    if path.is_dir():
        raise UsageError(f"{path} is a directory; give a file name for the output")
    refuse_dangling_link(path)
    if path.exists() and not force:
        raise UsageError(f"{path} already exists; pass --force to overwrite it")
    parent = path.parent if str(path.parent) else Path(".")
    if parent.exists() and not parent.is_dir():
        raise UsageError(f"{parent} is a file, not a directory; choose another output path")
    if not parent.is_dir():
        raise UsageError(f"output directory {parent} does not exist; create it first")
    try:  # root ignores permission bits, so ask the file system itself
        tempfile.TemporaryFile(dir=parent).close()
    except OSError as e:
        raise UsageError(f"cannot write in {parent} ({e.strerror}); choose another output path") from None


def refuse_dangling_link(path: Path) -> None:
    """A symlink to a missing file, as the output or a folder above it, passes every exists() test
    and fails only when the output is put in place (or its folder made): refuse it up front."""
    for p in (path, *path.parents):
        if p.exists():
            return
        if p.is_symlink():
            raise UsageError(f"{p} is a symlink to a missing file ({os.readlink(p)}); remove it or pass another path")


# --- temporaries ---------------------------------------------------------------------------------
def temp_path(path: Path, kind: str, n: int = 0) -> Path:
    """`.NAME.npft-PID.KIND`; `.NAME.npft-PID-N.KIND` for a second one of this process at once."""
    return path.with_name(f".{path.name}.npft-{os.getpid()}{f'-{n}' if n else ''}.{kind}")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    except OverflowError:
        return False
    return True


def _try_lock(fd: int) -> bool | None:
    """Lock without waiting: True taken, False held by another open file, None cannot tell."""
    if fcntl is None:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError:  # a file system without locks
        return None
    return True


def remove_stale(path: Path) -> list[Path]:
    """Remove the temporaries of `path` (`.NAME.npft-PID.KIND` beside it) that no live process
    owns: their PID is not running (or is ours, from an earlier process of that number) and
    nobody holds their lock. Returns what was removed."""
    parent = path.parent if str(path.parent) else Path(".")
    try:
        entries = list(parent.iterdir())
    except OSError:
        return []
    removed = []
    for p in entries:
        m = TEMP.match(p.name)
        if not m or m["name"] != path.name:
            continue
        pid = int(m["pid"])
        if pid != os.getpid() and _pid_alive(pid):
            continue
        try:  # O_NOFOLLOW: a link that merely has such a name is left alone
            fd = os.open(p, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        except OSError:
            continue
        try:
            if not _try_lock(fd):
                continue
            if stat.S_ISDIR(os.fstat(fd).st_mode):
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            removed.append(p)
        finally:
            os.close(fd)
    return removed


@contextmanager
def temporary(path: Path, kind: str, directory: bool = False):
    """An empty temporary file (or directory) `.NAME.npft-PID.KIND` beside `path`, locked while
    the block runs and removed when it ends, however it ends. Stale ones of `path` go first."""
    path = Path(path)
    remove_stale(path)
    for n in range(1000):  # what is left with our PID after remove_stale is this process's own, live
        tmp = temp_path(path, kind, n)
        try:
            if directory:
                os.mkdir(tmp)
                fd = os.open(tmp, os.O_RDONLY)
            else:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            break
        except FileExistsError:
            continue
    else:
        raise NpftError(f"cannot create a temporary beside {path}: too many of this process's own")
    try:
        _try_lock(fd)
        yield tmp
    finally:
        try:  # removed before the lock goes, so no other run ever sees it unlocked
            if directory:
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                tmp.unlink(missing_ok=True)
        finally:
            os.close(fd)


# --- a full disk ---------------------------------------------------------------------------------
NO_SPACE_WORDS = ("no space left on device", "os error 28", "storagefull", "disk quota exceeded")
SHORT_WRITE_WORDS = ("requested and", "inline_container.cc")  # numpy's tofile; torch.save's PytorchStreamWriter
NEARLY_FULL_BYTES = 16 << 20


def disk_full(exc: BaseException, where: Path | None = None) -> bool:
    """Whether `exc` is a write that failed for want of space: ENOSPC (EDQUOT, EFBIG) anywhere in
    its chain, or a message that says so (Rust's io errors, as safetensors passes them on), or, with
    `where`, a short write whose errno was lost (numpy: 'N requested and M written'; torch.save:
    '[enforce fail at inline_container.cc:...]') on a file system with almost nothing free there."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen and not isinstance(exc, NpftError):
        seen.add(id(exc))
        text = str(exc).lower()
        if (isinstance(exc, OSError) and exc.errno in DISK_FULL) or any(w in text for w in NO_SPACE_WORDS):
            return True
        if where is not None and any(w in text for w in SHORT_WRITE_WORDS) and _free_bytes(where) < NEARLY_FULL_BYTES:
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _free_bytes(where: Path) -> float:
    existing = next((p for p in (Path(where), *Path(where).parents) if p.exists()), Path("."))
    try:
        return shutil.disk_usage(existing).free
    except OSError:
        return float("inf")


def _mount_point(path: Path) -> Path:
    p = Path(path).resolve()
    while not os.path.ismount(p) and p != p.parent:
        p = p.parent
    return p


def no_space(target: Path | None) -> NpftError:
    """The one line for a full disk: which device (by its mount point), what was being written,
    and what was kept (outputs are atomic: the one being written is not left half done)."""
    if target is None:
        return NpftError("no space left on the device; nothing half-written was kept: free some space and run again")
    kept = f"{target} was left as it was" if target.exists() else "nothing was written"
    return NpftError(f"no space left on the device holding {_mount_point(target)} (writing {target}); {kept}: "
                     "free some space or choose another output path")


@contextmanager
def _disk_full_in_one_line(target: Path, tmp: Path):
    """A full disk while `tmp` (for `target`) is written becomes no_space's one line."""
    try:
        yield
    except Exception as e:
        if disk_full(e, tmp):
            raise no_space(target) from None
        raise


def _commit(tmp: Path, path: Path, force: bool) -> None:
    """Put the finished `tmp` at `path`: replacing it with `force`, else only if `path` does not
    exist at this moment (a hard link fails if it does; where hard links are not supported, an
    exclusively created placeholder is replaced)."""
    if force:
        os.replace(tmp, path)
        return
    taken = UsageError(f"{path} already exists (another run wrote it meanwhile); nothing was written; "
                       "pass --force to overwrite it")
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise taken from None
    except OSError as e:
        if e.errno not in NO_HARD_LINKS:
            raise
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:
            raise taken from None
        os.replace(tmp, path)


@contextmanager
def atomic_output(path: Path, force: bool = False):
    """Yield a temporary path; on success it becomes `path` (replacing it only with `force`), on
    any failure or interruption it is removed."""
    path = Path(path)
    check_target(path, force)
    with temporary(path, "part") as tmp, _disk_full_in_one_line(path, tmp):
        yield tmp
        pause_for_tests(f"commit:{path.name}")
        _commit(tmp, path, force)


@contextmanager
def staged_dir(out_dir: Path, last: tuple[str, ...] = (), replaces: tuple[Path, ...] = ()):
    """A temporary directory inside `out_dir` to fill; on success its files move into `out_dir`,
    the names in `last` last (so a folder holding them is complete); removed however it ends.
    `replaces`, an earlier output's files, go just before, the names in `last` first, so the
    folder never holds a mix of the two (a shard of the old model beside the new one)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with temporary(out_dir / "staged", "part", directory=True) as tmp, _disk_full_in_one_line(out_dir, tmp):
        yield tmp
        pause_for_tests(f"commit:{out_dir.name}/")
        for f in sorted(replaces, key=lambda p: p.name not in last):
            Path(f).unlink(missing_ok=True)
        for f in sorted(tmp.iterdir(), key=lambda p: p.name in last):
            os.replace(f, out_dir / f.name)


# --- one run at a time in an output folder ---------------------------------------------------------
FOLDER_LOCK = ".npft.lock"


@contextmanager
def folder_lock(directory: Path):
    """Hold `directory`'s lock (flock on DIRECTORY/.npft.lock, which names our PID) while the block
    runs: of two runs writing into one folder at once, the second fails at once in one line
    instead of both reporting success. The file goes on the way out; one that a SIGKILL left is
    unlocked, and the next run takes it."""
    lock = Path(directory) / FOLDER_LOCK
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o666)
        if _try_lock(fd) is False:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
            os.close(fd)
            raise UsageError(f"{directory} is already being written by another run{f' (PID {holder})' if holder else ''}; "
                             "wait for it to finish or choose another output")
        try:
            still_there = os.path.samestat(os.fstat(fd), os.stat(lock, follow_symlinks=False))
        except FileNotFoundError:
            still_there = False
        if still_there:
            break
        os.close(fd)  # its holder removed the file as we opened it: lock the next one
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        try:  # removed while still locked, so a run that opened it meanwhile starts again on a new file
            lock.unlink(missing_ok=True)
        finally:
            os.close(fd)
