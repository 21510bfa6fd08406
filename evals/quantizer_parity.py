#!/usr/bin/env python3
"""`npft-gguf export --type T [--imatrix F]` against llama.cpp's own llama_model_quantize, on the real
SmolLM2-135M, for the file types of issue 30 (mixes and pure types), and how long each takes.

  1. our F32 export:  npft-gguf export smollm2-135m -o f32.gguf --type f32
  2. an imatrix:      npft-gguf imatrix smollm2-135m --calib wiki --ctx 512 --chunks N -o imatrix.gguf
                      (or --imatrix FILE)
  3. per type T, without and with the imatrix (and Q4_0 also --pure):
        ours:   npft-gguf export smollm2-135m -o ours.gguf --type T [--pure] [--imatrix imatrix.gguf]
        theirs: llama_model_quantize(f32.gguf, theirs.gguf, T, pure, imatrix) -- llama-quantize's own
                code, through llama-cpp-python (npft_gguf.llamacpp.quantize)
     -> every tensor's name, type and data bytes compared (gguf.GGUFReader).
  4. time: `export --type q4_0 [--imatrix]` (the export itself, in this process, source opened
     before) against llama_model_quantize from the same F32 file, --repeats paired runs, medians;
     and, once, the whole `npft-gguf export` command (Python, torch and the source's loading included).
     Where the llama-quantize binary is built (evals/llamacpp_tools.py), its wall time too.

    python evals/quantizer_parity.py [--types q4_k_m,...] [--chunks 8] [--repeats 3] [--imatrix FILE]

Writes evals/QUANTIZER_PARITY.md (committed) and evals/out/quantizer_parity/results.json; the GGUF
files stay in evals/out/quantizer_parity/ (git-ignored).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from export_bench import git_rev, machine_info, versions  # noqa: E402
from imatrix_parity import compare_files  # noqa: E402

TYPES = ("q4_k_m", "q5_k_m", "q3_k_m", "q6_k", "iq4_xs", "q4_0", "iq4_nl")
OUT = HERE / "out" / "quantizer_parity"


def log(msg: str) -> None:
    print(f"[quantizer_parity] {msg}", file=sys.stderr, flush=True)


def run(cmd: list) -> float:
    """Run `cmd` from the repository root (so that `python -m npft_gguf.cli` is this checkout's code); its wall time."""
    log(" ".join(map(str, cmd)))
    t = time.perf_counter()
    done = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, cwd=HERE.parent)
    if done.returncode != 0:
        raise SystemExit(f"failed (exit {done.returncode}): {done.stderr.strip()[-800:]}")
    return time.perf_counter() - t


def llamacpp_weights(path: Path) -> dict:
    from npft_gguf.imatrix import read_imatrix

    im = read_imatrix(path)
    return {n: im.weights(n) for n in im.entries}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--types", default=",".join(TYPES))
    ap.add_argument("--chunks", type=int, default=8, help="imatrix windows of 512 tokens (when --imatrix is not given)")
    ap.add_argument("--imatrix", type=Path, help="an existing imatrix file for SmolLM2-135M")
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()

    from npft_gguf import llamacpp
    from npft_gguf.sources import open_source
    from npft_gguf.writer import ExportSettings, export

    OUT.mkdir(parents=True, exist_ok=True)
    npft = [sys.executable, "-m", "npft_gguf.cli"]  # this checkout's code, not an installed one
    f32 = OUT / "f32.gguf"
    run([*npft, "export", "smollm2-135m", "-o", f32, "--type", "f32", "--force"])
    im = a.imatrix
    imatrix_cmd = None
    if im is None:
        im = OUT / "imatrix.gguf"
        imatrix_cmd = f"npft-gguf imatrix smollm2-135m --calib wiki --ctx 512 --chunks {a.chunks}"
        if not im.is_file():
            run([*npft, "imatrix", "smollm2-135m", "--calib", "wiki", "--ctx", "512", "--chunks", a.chunks, "-o", im])
    weights = llamacpp_weights(im)
    src = open_source("smollm2-135m")

    cases = [(t, False) for t in a.types.split(",")] + ([("q4_0", True)] if "q4_0" in a.types.split(",") else [])
    rows = []
    for t, pure in cases:
        for with_im in (False, True):
            tag = f"{t}{'-pure' if pure else ''}{'-imatrix' if with_im else ''}"
            ours, theirs = OUT / f"ours-{tag}.gguf", OUT / f"llama-{tag}.gguf"
            log(f"{tag}: export, then llama_model_quantize")
            export(src, ours, ExportSettings(t, pure=pure, imatrix=str(im) if with_im else None), force=True, progress=False)
            if theirs.exists():
                theirs.unlink()
            llamacpp.quantize(f32, theirs, t, pure=pure, imatrix=weights if with_im else None)
            c = compare_files(ours, theirs)
            rows.append({"type": t, "pure": pure, "imatrix": with_im, **{k: c[k] for k in (
                "tensors", "types", "tensors_differing", "identical", "data_sha256_ours", "data_sha256_llama_quantize")}})
            log(f"{tag}: {'identical' if c['identical'] else 'DIFFERENT: ' + ', '.join(c['tensors_differing'][:5])}")

    timing = {}
    for with_im in (False, True):
        ours_s, theirs_s = [], []
        for _ in range(a.repeats):  # paired, alternating
            t0 = time.perf_counter()
            export(src, OUT / "time-ours.gguf", ExportSettings("q4_0", imatrix=str(im) if with_im else None), force=True, progress=False)
            ours_s.append(time.perf_counter() - t0)
            (OUT / "time-theirs.gguf").unlink(missing_ok=True)
            t0 = time.perf_counter()
            llamacpp.quantize(f32, OUT / "time-theirs.gguf", "q4_0", imatrix=weights if with_im else None)
            theirs_s.append(time.perf_counter() - t0)
        key = "q4_0" + (" --imatrix" if with_im else "")
        timing[key] = {"export_s": ours_s, "llama_model_quantize_s": theirs_s,
                       "export_median_s": statistics.median(ours_s), "llama_model_quantize_median_s": statistics.median(theirs_s)}
        cmd = [*npft, "export", "smollm2-135m", "-o", OUT / "time-cli.gguf", "--type", "q4_0", "--force"]
        timing[key]["cli_s"] = run(cmd + (["--imatrix", im] if with_im else []))
        quantize_bin = next(iter(sorted(Path(os.path.expanduser("~/.cache/npft-gguf")).glob("llama.cpp-tools/*/build/bin/llama-quantize"))), None)
        if quantize_bin is not None:
            timing[key]["llama_quantize_binary_s"] = run([quantize_bin, *(["--imatrix", im] if with_im else []), f32,
                                                          OUT / "time-bin.gguf", "q4_0"])

    info = {"date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "machine": machine_info(),
            "versions": versions(), "git": git_rev(HERE.parent),
            "command": "python evals/quantizer_parity.py " + " ".join(sys.argv[1:]),
            "imatrix": str(im), "imatrix_command": imatrix_cmd, "rows": rows, "timing": timing,
            "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None}
    (OUT / "results.json").write_text(json.dumps(info, indent=1))
    (HERE / "QUANTIZER_PARITY.md").write_text(page(info))
    log(f"wrote {HERE / 'QUANTIZER_PARITY.md'}")
    if not all(r["identical"] for r in rows):
        raise SystemExit("some files differ from llama_model_quantize's")


def page(info: dict) -> str:
    m = info["machine"]
    lines = [
        "# Our export against llama.cpp's own quantizer (SmolLM2-135M)", "",
        f"`{info['command']}` on {info['date']}; {m.get('cpu')} ({m.get('cores_usable')} cores usable), git {info['git']}, "
        f"llama-cpp-python {info['versions'].get('llama-cpp-python')}, gguf {info['versions'].get('gguf')}.", "",
        "Per file type: `npft-gguf export smollm2-135m --type T [--pure] [--imatrix F]` against "
        "`llama_model_quantize` (llama-quantize's code, through llama-cpp-python) of our F32 export of the same "
        "model, with the same imatrix entries. Identical = every tensor's name, type and data bytes equal "
        "(gguf.GGUFReader); the files differ only in metadata keys (our provenance). SmolLM2's rows are 576 and "
        "1536 wide: the 256-weight K and IQ4_XS types fit only the feed-forward down projection (1536), and every "
        "other tensor takes llama.cpp's fallback.", "",
        f"Imatrix: {info['imatrix_command'] or info['imatrix']}.", "",
        "| type | --pure | imatrix | tensors | tensor types (ours) | identical |", "|---|---|---|---|---|---|"]
    for r in info["rows"]:
        kinds = ", ".join(f"{k} x{v}" for k, v in r["types"].items())
        verdict = "yes" if r["identical"] else "NO: " + ", ".join(r["tensors_differing"][:4])
        lines.append(f"| {r['type']} | {'yes' if r['pure'] else ''} | {'yes' if r['imatrix'] else ''} | {r['tensors']} | {kinds} | {verdict} |")
    lines += ["", "## Time, from the same F32 file", "",
              f"Seconds, median of {len(next(iter(info['timing'].values()))['export_s'])} paired runs: `export` "
              "(writer.export in one process, source opened before; reads the safetensors, writes the GGUF) and "
              "`llama_model_quantize` (reads the F32 GGUF, writes the GGUF); `npft-gguf export` once, as a command "
              "(Python, torch and the source's loading included)."
              + (f" Load average after the run: {' / '.join(f'{x:.1f}' for x in info['load_average'])} (1 / 5 / 15 min)."
                 if info.get("load_average") else ""), "",
              "| export --type | export (s) | llama_model_quantize (s) | npft-gguf export command (s) |"
              + (" llama-quantize binary (s) |" if any("llama_quantize_binary_s" in t for t in info["timing"].values()) else ""),
              "|---|---|---|---|" + ("---|" if any("llama_quantize_binary_s" in t for t in info["timing"].values()) else "")]
    for k, t in info["timing"].items():
        extra = f" {t['llama_quantize_binary_s']:.2f} |" if "llama_quantize_binary_s" in t else ""
        lines.append(f"| {k} | {t['export_median_s']:.2f} | {t['llama_model_quantize_median_s']:.2f} | {t['cli_s']:.2f} |{extra}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
