"""Throughput the way llama-bench measures it: pp = one prompt of N tokens from an empty cache,
tg = N single-token decodes; tokens per second, mean +- sd over repetitions, after one warm-up."""

from __future__ import annotations

import random
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .. import llamacpp
from ..errors import UsageError
from ..progress import bar
from ..signals import pause_for_tests
from .models import default_threads, require_file, require_gpu_offload


@dataclass(frozen=True)
class BenchSettings:
    pp: int = 512
    tg: int = 128
    reps: int = 5
    threads: int | None = None
    n_gpu_layers: int = 0

    def __post_init__(self):
        if not self.pp and not self.tg:
            raise UsageError("--pp 0 with --tg 0 measures nothing; give at least one of them a length")
        if self.reps < 1:
            raise UsageError("--reps must be >= 1")


@dataclass
class BenchResult:
    model: str
    settings: dict
    backend: str
    pp_tps: list = field(default_factory=list)
    tg_tps: list = field(default_factory=list)
    interrupted: bool = False

    def summary(self) -> dict:
        def ms(x):
            return {"mean": statistics.fmean(x), "sd": statistics.stdev(x) if len(x) > 1 else 0.0, "n": len(x)} if x else None

        return {**asdict(self), "pp": ms(self.pp_tps), "tg": ms(self.tg_tps)}


def bench(path: Path, settings: BenchSettings, progress: bool = True, partial: bool = False) -> BenchResult:
    """Throughput of `path`. Ctrl-C (or SIGTERM) goes on to the caller, unless it asks for a
    `partial` result: then the repetitions measured come back, marked `interrupted`."""
    path = require_file(path, "give a GGUF file")
    require_gpu_offload(settings.n_gpu_layers)
    threads = settings.threads or default_threads()
    n_ctx = max(settings.pp, settings.tg) + 8
    llm = llamacpp.load(path, n_ctx=n_ctx, n_threads=threads, n_gpu_layers=settings.n_gpu_layers,
                        logits_all=False, n_batch=max(settings.pp, 1))
    backend = ("GPU" if settings.n_gpu_layers else "CPU") + f" ({llamacpp.system_info()[:80]})"
    result = BenchResult(str(path), {**asdict(settings), "threads": threads}, backend)
    rng = random.Random(0)
    vocab = llm.n_vocab()

    def prompt(n):
        return [rng.randrange(vocab) for _ in range(n)]

    def run_pp():
        llm.reset()
        t = time.perf_counter()
        llm.eval(prompt(settings.pp))
        return settings.pp / (time.perf_counter() - t)

    def run_tg():
        llm.reset()
        toks = prompt(settings.tg)
        t = time.perf_counter()
        for tok in toks:
            llm.eval([tok])
        return settings.tg / (time.perf_counter() - t)

    try:
        if settings.pp:
            run_pp()  # warm-up
        for _ in bar(range(settings.reps), desc="bench", unit="rep", disable=not progress):
            if settings.pp:
                result.pp_tps.append(run_pp())
            if settings.tg:
                result.tg_tps.append(run_tg())
            pause_for_tests("bench:rep")
    except KeyboardInterrupt:
        if not partial:
            raise
        result.interrupted = True
    return result


def format_text(r: BenchResult) -> str:
    s = r.summary()
    lines = [f"{r.model}", f"  backend  {r.backend}, {r.settings['threads']} threads, n_gpu_layers {r.settings['n_gpu_layers']}"]
    for key in ("pp", "tg"):
        if s[key]:
            n = r.settings[key]
            lines.append(f"  {key}{n:<6} {s[key]['mean']:9.2f} +/- {s[key]['sd']:.2f} t/s  ({s[key]['n']} reps)")
    if r.interrupted:
        lines.append("  [interrupted: the figures above are what was measured]")
    return "\n".join(lines)
