"""All-or-nothing outputs: temporaries named for their output and process, removed however a run
ends or by the next run once their process is gone (never a live one's), and a final name that
only one of two concurrent writers gets."""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from npft_gguf.atomic import atomic_output, remove_stale, staged_dir, temporary
from npft_gguf.errors import NpftError, UsageError
from npft_gguf.signals import EXIT_INTERRUPTED, EXIT_TERMINATED, Terminated, sigterm_as_interrupt


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def names(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir())


def test_temporaries_are_named_for_their_output_and_process(tmp_path):
    out = tmp_path / "m.gguf"
    with atomic_output(out) as tmp, temporary(out, "f32") as f32:
        assert tmp.name == f".m.gguf.npft-{os.getpid()}.part" and tmp.exists()
        assert f32.name == f".m.gguf.npft-{os.getpid()}.f32" and f32.exists()
        tmp.write_bytes(b"done")
    assert names(tmp_path) == ["m.gguf"] and out.read_bytes() == b"done"


def test_the_next_write_removes_what_dead_processes_left_and_nothing_else(tmp_path):
    out = tmp_path / "m.gguf"
    gone = dead_pid()
    stale = [tmp_path / f".m.gguf.npft-{gone}.part", tmp_path / f".m.gguf.npft-{gone}.f32"]
    for p in stale:
        p.write_bytes(b"left by SIGKILL")
    stale_dir = tmp_path / f".m.gguf.npft-{gone}-1.part"  # a staged directory, with content
    (stale_dir / "sub").mkdir(parents=True)
    (stale_dir / "sub" / "x").write_bytes(b"x")
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        kept = [tmp_path / f".m.gguf.npft-{live.pid}.part",    # its process is running
                tmp_path / f".other.gguf.npft-{gone}.part",    # another output's (removed when that one is written)
                tmp_path / "m.gguf.npft-1.part",               # not hidden: not one of ours
                tmp_path / f".m.gguf.{gone}.part"]             # the old naming, which told nothing of its owner
        locked = tmp_path / f".m.gguf.npft-{gone}-7.part"      # its PID is gone but someone holds its lock
        for p in [*kept, locked]:
            p.write_bytes(b"keep")
        holder = os.open(locked, os.O_RDONLY)
        fcntl.flock(holder, fcntl.LOCK_EX)
        try:
            with atomic_output(out) as tmp:
                tmp.write_bytes(b"new")
        finally:
            os.close(holder)
    finally:
        live.kill()
        live.wait()
    assert not any(p.exists() for p in [*stale, stale_dir])
    assert all(p.exists() for p in [*kept, locked]) and out.read_bytes() == b"new"
    # once the lock is released, the next run may take it
    assert locked in remove_stale(out)


def test_a_symlink_with_a_temporary_name_is_left_alone(tmp_path):
    target = tmp_path / "precious"
    target.write_bytes(b"data")
    link = tmp_path / f".m.gguf.npft-{dead_pid()}.part"
    link.symlink_to(target)
    remove_stale(tmp_path / "m.gguf")
    assert link.is_symlink() and target.read_bytes() == b"data"


def test_of_two_writers_of_one_output_only_the_first_to_finish_wins(tmp_path):
    out = tmp_path / "m.gguf"
    slow = atomic_output(out)
    a = slow.__enter__()
    a.write_bytes(b"slow")
    with atomic_output(out) as b:  # started after, finished first
        assert b != a
        b.write_bytes(b"fast")
    with pytest.raises(UsageError, match="already exists .*--force"):
        slow.__exit__(None, None, None)
    assert out.read_bytes() == b"fast" and names(tmp_path) == ["m.gguf"]
    with atomic_output(out, force=True) as c:  # --force replaces it
        c.write_bytes(b"forced")
    assert out.read_bytes() == b"forced" and names(tmp_path) == ["m.gguf"]


def test_a_full_disk_is_one_error_and_leaves_nothing(tmp_path):
    out = tmp_path / "m.gguf"
    with pytest.raises(NpftError, match=r"no space left .*m\.gguf.*nothing was written"):
        with atomic_output(out) as tmp:
            tmp.write_bytes(b"half")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert names(tmp_path) == []


def short_write(library: str) -> Exception:
    """What each library raises when the disk fills under it (/dev/full: every write fails with
    ENOSPC): numpy's tofile (the GGUF writer) and torch.save lose the errno on the way. Rust's
    safetensors cannot be pointed at /dev/full (it writes beside its target and renames: it would
    replace the device), so its case is the io error as Rust prints it."""
    if library == "safetensors":
        return Exception('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })')
    try:
        if library == "numpy":
            import numpy as np

            with open("/dev/full", "wb") as f:
                np.zeros(1 << 20, np.uint8).tofile(f)
        else:
            import torch

            torch.save({"w": torch.zeros(1 << 18)}, "/dev/full")
    except Exception as e:  # noqa: BLE001 - whatever it is, the test uses it
        return e
    raise AssertionError(f"{library} wrote to /dev/full")


@pytest.fixture
def full_disk(monkeypatch):
    """The file system reports no free space (where a write just ran out of it)."""
    usage = shutil.disk_usage("/")
    monkeypatch.setattr(shutil, "disk_usage", lambda _p: usage._replace(used=usage.total, free=0))


@pytest.mark.parametrize("library", ["numpy", "torch", "safetensors"])
def test_a_short_write_on_a_full_disk_says_no_space(tmp_path, full_disk, library):
    """A GGUF write (numpy) said `OSError: N requested and M written`, a checkpoint (torch.save)
    `RuntimeError: [enforce fail at inline_container.cc:672]`: the device, the file and what was kept."""
    out = tmp_path / "m.gguf"
    error = short_write(library)
    with pytest.raises(NpftError) as e:
        with atomic_output(out) as tmp:
            tmp.write_bytes(b"half")
            raise error
    assert str(e.value) == (f"no space left on the device holding {mount_point(tmp_path)} (writing {out}); nothing was "
                            "written: free some space or choose another output path") and e.value.exit_code == 1
    assert names(tmp_path) == []
    out.write_bytes(b"the previous checkpoint")
    with pytest.raises(NpftError, match=f"{out} was left as it was"):
        with atomic_output(out, force=True):
            raise error
    assert names(tmp_path) == ["m.gguf"] and out.read_bytes() == b"the previous checkpoint"


@pytest.mark.parametrize("library", ["numpy", "torch"])
def test_a_short_write_with_room_left_is_not_called_a_full_disk(tmp_path, library):
    error = short_write(library)
    with pytest.raises(type(error)):
        with atomic_output(tmp_path / "m.gguf"):
            raise error
    assert names(tmp_path) == []


def mount_point(path: Path) -> Path:
    path = path.resolve()
    return next(p for p in (path, *path.parents) if os.path.ismount(p))


def test_a_full_disk_in_a_command_is_one_line(tiny_bpe, tmp_path, full_disk, monkeypatch):
    """export (and convert, which writes through it) on a disk that fills while tensors are written."""
    from gguf import GGUFWriter

    from tests.test_cli import assert_fails, run

    error = short_write("numpy")

    def write_tensor_data(self, *_a, **_k):
        raise error

    monkeypatch.setattr(GGUFWriter, "write_tensor_data", write_tensor_data)
    line = assert_fails(run("export", tiny_bpe, "-o", tmp_path / "m.gguf", "--type", "q8_0"), 1,
                        f"no space left on the device holding {mount_point(tmp_path)}", "m.gguf", "nothing was written")
    assert "requested" not in line and names(tmp_path) == []


def test_a_full_disk_outside_an_output_is_one_line_too(tiny_bpe, tmp_path, monkeypatch):
    """Anything else that runs out of space (compare's recorded logits, a download) still says so."""
    import npft_gguf.demo as demo

    from tests.test_cli import assert_fails, run

    def no_space(*_a, **_k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "x.npy"))

    monkeypatch.setattr(demo, "resolve", no_space)
    assert_fails(run("inspect", "anything"), 1, f"no space left on the device holding {mount_point(tmp_path)}", "x.npy")


def test_staged_dir_moves_its_files_in_with_the_last_ones_last(tmp_path, monkeypatch):
    d = tmp_path / "model"
    seen, real = [], os.replace
    with staged_dir(d, last=("config.json",)) as tmp:
        for name in ("config.json", "model.safetensors", "tokenizer.json"):
            (tmp / name).write_text(name)
        monkeypatch.setattr(os, "replace", lambda a, b: (seen.append(Path(b).name), real(a, b))[1])
    monkeypatch.undo()
    assert seen[-1] == "config.json" and sorted(seen) == names(d)
    with pytest.raises(RuntimeError):
        with staged_dir(d) as tmp:
            (tmp / "partial").write_text("x")
            raise RuntimeError("interrupted")
    assert names(d) == ["config.json", "model.safetensors", "tokenizer.json"]


def test_sigterm_unwinds_like_ctrl_c_and_exits_143():
    before = signal.getsignal(signal.SIGTERM)
    cleaned = []
    with pytest.raises(Terminated):
        with sigterm_as_interrupt():
            try:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(5)
            finally:
                cleaned.append(True)
    assert cleaned and issubclass(Terminated, KeyboardInterrupt)
    assert signal.getsignal(signal.SIGTERM) is before
    with pytest.raises(SystemExit) as e:  # the CLI's 'interrupted' exit after a SIGTERM
        with sigterm_as_interrupt():
            try:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(5)
            except KeyboardInterrupt:
                sys.exit(EXIT_INTERRUPTED)
    assert e.value.code == EXIT_TERMINATED == 143
    with pytest.raises(SystemExit) as e:  # without a SIGTERM an exit is left alone
        with sigterm_as_interrupt():
            sys.exit(EXIT_INTERRUPTED)
    assert e.value.code == EXIT_INTERRUPTED == 130
