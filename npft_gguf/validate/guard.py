"""Never farther from the float model than the peer: convert's check before it keeps a tuned file.

NPFT tunes on calibration text; on a model where that does not carry over, the tuned file can end
up farther from the float model than llama.cpp's own quantization of the untuned model with the
same importance matrix (a held-out model measured 0.252 against 0.227 mean KLD). So before convert
keeps the tuned file it measures both against the float model, in llama.cpp, on text that no stage
of the run has read: the end of the calibration text, held back from the calibration segments, the
importance matrix and the tuning (calib.split_holdout), and never the evaluation text. The peer is
what the user would get without npft-gguf's tuning: the untuned model written by the same rules
(with the imatrix where the method has one).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

HOLDOUT = 0.1  # the share of the calibration text held back for the guard
CHUNKS = 10    # windows of the held-back text the guard measures on (fewer when it holds fewer)


@dataclass(frozen=True)
class Verdict:
    tuned_kld: float
    peer_kld: float
    peer: str       # what the peer is, in words
    text: str       # what was measured on
    ctx: int
    chunks: int

    @property
    def tuned_closer(self) -> bool:
        return self.tuned_kld < self.peer_kld

    def sentence(self) -> str:
        return (f"mean KLD against the float model on {self.text} ({self.chunks} x {self.ctx} tokens): tuned "
                f"{self.tuned_kld:.4f}, {self.peer} {self.peer_kld:.4f}")

    def as_dict(self) -> dict:
        return asdict(self) | {"tuned_closer": self.tuned_closer}


def judge(tuned: Path, peer: Path, peer_label: str, ref: Path, text: str, ctx: int, chunks: int,
          threads: int | None = None, progress: bool = True, n_gpu_layers: int = 0) -> Verdict:
    """Both files against the float reference `ref` on `text`, the same tokens for each (with
    `n_gpu_layers` offloaded where llama.cpp has a GPU)."""
    from .compare import compare
    from .perplexity import EvalSettings

    name = "the held-back end of the calibration text"
    report = compare([peer, tuned], ref, text, name, EvalSettings(ctx=ctx, chunks=chunks), None, threads, progress=progress,
                     n_gpu_layers=n_gpu_layers)
    kld = {Path(r["file"]): r["kld_mean"] for r in report["rows"]}
    return Verdict(tuned_kld=kld[Path(tuned)], peer_kld=kld[Path(peer)], peer=peer_label, text=name, ctx=ctx,
                   chunks=report["chunks"])


def note(record: dict) -> str:
    """One paragraph for the run report: what the guard measured and which file was written."""
    v = Verdict(**{k: record[k] for k in ("tuned_kld", "peer_kld", "peer", "text", "ctx", "chunks")})
    if record["written"] == "peer":
        return (f"Guard: the tuned file was not closer to the float model than {v.peer} ({v.sentence()}), so the "
                f"output is that file; the tuned one is {record['tuned_file']} (--keep-tuned writes it).\n")
    verdict = "closer" if v.tuned_closer else "NOT closer, and kept as --keep-tuned asks"
    return f"Guard: the tuned file is {verdict} ({v.sentence()}).\n"
