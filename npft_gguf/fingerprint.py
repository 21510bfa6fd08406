"""Which model a file in a run directory was made from.

A run directory keeps what it made (the untuned float and RTN references, the epoch checkpoint) so
that a repeated or resumed run need not make it again; each is reused only when its record names
the same source fingerprint and the same settings, so a run for model B never measures itself
against model A's reference or resumes model A's tuning.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

SAMPLE = 1 << 16  # bytes read at each of four places in a large file
# a Hugging Face folder's files that make the model: config, weights, tokenizer (not a README or a text beside them)
MODEL_SUFFIXES = (".json", ".safetensors", ".bin", ".pth", ".model", ".jinja", ".tiktoken")


def source_fingerprint(source) -> str:
    """16 hex digits of sha256 over the source's files (a GGUF file, or a Hugging Face folder's
    config, weight and tokenizer files): names, sizes and modification times, and the bytes, whole for
    small files, four 64 KiB samples of a large one. Cheap however large the model (under 1 MiB
    read per file), and two models of one shape differ in every sample of their weights; a file
    rewritten in place changes its modification time."""
    path = Path(source.path)
    files = [path] if path.is_file() else sorted(
        f for f in path.iterdir() if f.is_file() and (f.suffix in MODEL_SUFFIXES or f.name == "merges.txt"))
    h = hashlib.sha256(f"{source.kind}\0".encode())
    for f in files:
        st = f.stat()
        h.update(f"{f.name}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
        with open(f, "rb") as fh:
            if st.st_size <= 4 * SAMPLE:
                h.update(fh.read())
                continue
            for at in (0, st.st_size // 3, 2 * st.st_size // 3, st.st_size - SAMPLE):
                fh.seek(at)
                h.update(fh.read(SAMPLE))
    return h.hexdigest()[:16]


def source_record(source) -> dict:
    """What a run directory's files record of their source: its name for messages, its fingerprint
    for the comparison."""
    return {"spec": source.spec, "fingerprint": source_fingerprint(source)}


def file_digest(path: Path) -> str:
    """16 hex digits of sha256 over a whole (small) file: an importance matrix that a comparison file was made with."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]
