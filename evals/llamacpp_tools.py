#!/usr/bin/env python3
"""llama.cpp's command-line tools (llama-imatrix, llama-quantize), built once from the llama.cpp
tree vendored in the llama-cpp-python sdist the project pins, into the project's cache:

    <npft-gguf cache>/llama.cpp-tools/<version>/{llama.cpp,build}    (cache: $NPFT_GGUF_CACHE or ~/.cache/npft-gguf)

The source comes as evals/perplexity_vs_llamacpp.py fetches it (pip download of the sdist,
sha256-checked, vendor/llama.cpp extracted once); it is configured with the same CMake options
plus static libraries, and only the asked-for targets are built (`-j` = the usable cores, niced).
A second call finds the binaries and builds nothing.

    python evals/llamacpp_tools.py [--jobs N] [llama-imatrix llama-quantize ...]

prints each tool's path. In Python: `tools(["llama-imatrix", "llama-quantize"])` -> {name: path}.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from perplexity_vs_llamacpp import CMAKE_OPTIONS, SDIST_VERSION, EvalError, source_tree  # noqa: E402

DEFAULT_TARGETS = ("llama-imatrix", "llama-quantize")
CMAKE_FLAGS = (*CMAKE_OPTIONS, "-DBUILD_SHARED_LIBS=OFF")  # static: the binaries need nothing beside them


def log(msg: str) -> None:
    print(f"[llamacpp_tools] {msg}", file=sys.stderr, flush=True)


def root_dir() -> Path:
    from npft_gguf.fetch import cache_dir

    return cache_dir() / "llama.cpp-tools" / SDIST_VERSION


def tools(targets=DEFAULT_TARGETS, jobs: int | None = None) -> dict[str, Path]:
    """{target: executable}, building what is not built yet."""
    root = root_dir()
    build = root / "build"
    want = {t: build / "bin" / t for t in targets}
    missing = [t for t, p in want.items() if not (p.is_file() and os.access(p, os.X_OK))]
    if not missing:
        return want
    tree = source_tree(root)
    jobs = jobs or len(os.sched_getaffinity(0))
    gen = ["-G", "Ninja"] if shutil.which("ninja") else []
    nice = ["nice", "-n", "10"] if shutil.which("nice") else []
    if not (build / "CMakeCache.txt").is_file():
        log("configuring llama.cpp (cmake)")
        _run([*nice, "cmake", "-S", str(tree), "-B", str(build), *gen, *CMAKE_FLAGS], root / "cmake-configure.log")
    log(f"building {' '.join(missing)} with -j{jobs} (several minutes on 2 cores)")
    _run([*nice, "cmake", "--build", str(build), "--target", *missing, "-j", str(jobs)], root / "cmake-build.log")
    for t in missing:
        if not want[t].is_file():
            raise EvalError(f"the build finished without {want[t]}; see {root / 'cmake-build.log'}")
    return want


def _run(cmd: list[str], log_path: Path) -> None:
    with open(log_path, "w") as f:
        done = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        tail = log_path.read_text(errors="replace").strip().splitlines()[-5:]
        raise EvalError(f"{' '.join(cmd[:4])} ... failed (exit {done.returncode}); {log_path}:\n" + "\n".join(tail))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("targets", nargs="*", default=list(DEFAULT_TARGETS))
    ap.add_argument("--jobs", type=int, help="parallel build jobs (default: the usable cores)")
    a = ap.parse_args(argv)
    try:
        paths = tools(a.targets, a.jobs)
    except EvalError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for t, p in paths.items():
        print(f"{t}\t{p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
