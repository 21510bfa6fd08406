"""Named texts for evaluation and calibration: local files first, the datasets hub as the fallback."""

from __future__ import annotations

import os
from pathlib import Path

from .errors import NpftError, UsageError

REPO = Path(__file__).resolve().parents[1]
LOCAL_WIKITEXT2 = [
    Path(os.environ["NPFT_GGUF_WIKITEXT2"]) if os.environ.get("NPFT_GGUF_WIKITEXT2") else None,
    REPO.parent / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw",
    Path.cwd() / "wikitext-2-raw" / "wiki.test.raw",
]
NAMED = ("wikitext2", "c4")


def wikitext2_path() -> Path | None:
    for p in LOCAL_WIKITEXT2:
        if p is not None and p.is_file():
            return p
    return None


def load_text(spec: str) -> tuple[str, str]:
    """(name, text) for 'wikitext2', 'c4' or a file path."""
    if spec == "wikitext2":
        local = wikitext2_path()
        if local:
            return f"wikitext2 ({local})", local.read_text(encoding="utf-8")
        rows = hub_rows("wikitext", "wikitext-2-raw-v1", "test", "text")
        return "wikitext2 (hub)", "".join(rows)
    if spec == "c4":
        rows = hub_rows("allenai/c4", "en", "validation", "text", data_files={"validation": "en/c4-validation.00000-of-00008.json.gz"})
        return "c4 validation shard 0 (hub)", "\n\n".join(rows[:1100])
    path = Path(spec).expanduser()
    if not path.is_file():
        raise UsageError(f"text {spec!r}: no such file; use wikitext2, c4 or a path to a UTF-8 text file")
    try:
        return str(path), path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UsageError(f"{path} is not UTF-8 text") from None


def hub_rows(name, config, split, column, **kw) -> list[str]:
    try:
        import datasets  # optional: only for hub texts

        ds = datasets.load_dataset(name, config, split=split, **kw)
        return list(ds[column])
    except ImportError:
        raise NpftError(f"{name} is not on this machine and the `datasets` package is not installed; "
                        "pass a local text file instead (pip install datasets to fetch it)") from None
    except Exception as e:  # noqa: BLE001 - offline, missing, gated
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise NpftError(f"could not fetch {name} from the Hugging Face Hub ({first}); pass a local text file instead") from None
