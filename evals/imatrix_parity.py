#!/usr/bin/env python3
"""Our importance matrix and importance-weighted quantization against llama.cpp's own tools, on
SmolLM2-135M.

  1. our F32 export:           npft-gguf export smollm2-135m -o f32.gguf --type f32
  2. llama.cpp's imatrix:      llama-imatrix -m f32.gguf -f calib.txt -c 512 -b 512 --chunks 64 --no-ppl
     ours, same text/windows:  npft-gguf imatrix smollm2-135m --calib calib.txt --ctx 512 --chunks 64
     -> entry by entry: token counts equal, sums within float tolerance
  3. per type (q4_0 q4_1 q5_0 q5_1 iq4_nl), with llama-imatrix's file:
        llama-quantize --imatrix theirs.imatrix.gguf f32.gguf lq-TYPE.gguf TYPE
        npft-gguf export smollm2-135m -o ours-TYPE.gguf --type TYPE --imatrix theirs.imatrix.gguf
     -> tensor names, types and data bytes compared; sha256 of the tensor data (all tensors, in
        file order) of each file. The whole files differ only in metadata (provenance keys).
  4. with our imatrix file (--cross-types, default q4_0): llama-quantize reads it, and gives the
     same bytes as our export with it.

The calibration text is the `wiki` calibration text (npft_gguf.calib: Wikipedia articles fetched
from PyPI), its first --chars characters written to a file both tools read. llama-imatrix and
llama-quantize are built once from the llama-cpp-python sdist (evals/llamacpp_tools.py).

    python evals/imatrix_parity.py [--chunks 64] [--ctx 512] [--types q4_0,...] [--threads 2]

Writes evals/IMATRIX_PARITY.md (committed) and evals/out/imatrix_parity/results.json; the GGUF
files stay in evals/out/imatrix_parity/ (git-ignored).
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from export_bench import git_rev, machine_info, npft_cmd, versions  # noqa: E402
from llamacpp_tools import tools  # noqa: E402

from npft_gguf.fetch import sha256 as sha256_file  # noqa: E402

TYPES = ("q4_0", "q4_1", "q5_0", "q5_1", "iq4_nl")


def log(msg: str) -> None:
    print(f"[imatrix_parity] {msg}", file=sys.stderr, flush=True)


def run(name: str, cmd: list, work: Path, env: dict | None = None) -> float:
    """Run `cmd`, its output to work/NAME.log; returns the wall time (s)."""
    log(f"{name}: {' '.join(map(str, cmd))}")
    t = time.perf_counter()
    with open(work / f"{name}.log", "w") as f:
        done = subprocess.run([str(c) for c in cmd], stdout=f, stderr=subprocess.STDOUT, env=env)
    wall = time.perf_counter() - t
    if done.returncode != 0:
        tail = (work / f"{name}.log").read_text(errors="replace").strip().splitlines()[-8:]
        raise SystemExit(f"{name} failed (exit {done.returncode}):\n" + "\n".join(tail))
    return wall


def tensors(path: Path) -> dict:
    """name -> (type name, data bytes as uint8), in file order."""
    import numpy as np
    from gguf import GGUFReader

    return {t.name: (t.tensor_type.name.lower(), np.asarray(t.data).reshape(-1).view(np.uint8)) for t in GGUFReader(path).tensors}


def data_sha256(ts: dict) -> str:
    """sha256 over every tensor's name and data bytes, in name order (llama-quantize writes the
    tensors sorted by name, our writer in the source's order)."""
    h = hashlib.sha256()
    for n in sorted(ts):
        h.update(n.encode() + b"\0" + ts[n][0].encode() + b"\0" + ts[n][1].tobytes())
    return h.hexdigest()


def compare_files(ours: Path, theirs: Path) -> dict:
    import numpy as np

    a, b = tensors(ours), tensors(theirs)
    types = {}
    for _, (t, _) in a.items():
        types[t] = types.get(t, 0) + 1
    differ = sorted(n for n in set(a) | set(b) if n not in a or n not in b or a[n][0] != b[n][0]
                    or not np.array_equal(a[n][1], b[n][1]))
    return {"tensors": len(a), "same_names": sorted(a) == sorted(b), "same_order": list(a) == list(b),
            "types": dict(sorted(types.items())), "tensors_differing": differ,
            "data_sha256_ours": data_sha256(a), "data_sha256_llama_quantize": data_sha256(b),
            "file_sha256_ours": sha256_file(ours), "file_sha256_llama_quantize": sha256_file(theirs),
            "identical": sorted(a) == sorted(b) and not differ}


def block_agreement(x: Path, y: Path) -> dict:
    """Two quantizations of the same weights: the share of tensors and of blocks that are equal."""
    import numpy as np
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    a, b = tensors(x), tensors(y)
    same_t, blocks, same_b = 0, 0, 0
    for n, (t, data) in a.items():
        other = b[n][1]
        same_t += bool(np.array_equal(data, other))
        if t in ("f32", "f16"):
            continue
        size = GGML_QUANT_SIZES[GGMLQuantizationType[t.upper()]][1]
        eq = (data.reshape(-1, size) == other.reshape(-1, size)).all(1)
        blocks += eq.size
        same_b += int(eq.sum())
    return {"tensors": len(a), "tensors_equal": same_t, "blocks": blocks, "blocks_equal_pct": 100.0 * same_b / max(blocks, 1)}


def compare_imatrix(ours: Path, theirs: Path) -> dict:
    import numpy as np

    from npft_gguf.imatrix import read_imatrix

    a, b = read_imatrix(ours), read_imatrix(theirs)
    rows, counts_equal = [], True
    for name in sorted(set(a.entries) | set(b.entries)):
        if name not in a.entries or name not in b.entries:
            rows.append({"tensor": name, "missing_in": "ours" if name not in a.entries else "llama-imatrix"})
            continue
        ea, eb = a.entries[name], b.entries[name]
        counts_equal &= bool(np.array_equal(ea.counts, eb.counts))
        x, y = ea.sums.astype(np.float64).ravel(), eb.sums.astype(np.float64).ravel()
        rows.append({"tensor": name, "counts": [float(ea.counts[0]), float(eb.counts[0])],
                     "rel_l2": float(np.linalg.norm(x - y) / np.linalg.norm(y)),
                     "max_rel": float(np.max(np.abs(x - y) / np.maximum(np.abs(y), 1e-30 + 1e-6 * np.abs(y).max())))})
    found = [r for r in rows if "rel_l2" in r]
    worst = max(found, key=lambda r: r["rel_l2"]) if found else None
    return {"entries_ours": len(a), "entries_llama_imatrix": len(b), "counts_equal": counts_equal,
            "chunk_count": [a.chunk_count, b.chunk_count], "chunk_size": [a.chunk_size, b.chunk_size],
            "rel_l2_max": worst["rel_l2"] if worst else None, "rel_l2_worst_tensor": worst["tensor"] if worst else None,
            "rel_l2_median": float(np.median([r["rel_l2"] for r in found])) if found else None,
            "max_rel_max": max(r["max_rel"] for r in found) if found else None,
            "missing": [r for r in rows if "missing_in" in r], "rows": rows}


def compare_tokens(f32: Path, text: str, n: int) -> dict:
    """llama.cpp's tokens of the text (as llama-imatrix tokenizes it) against the HF tokenizer's."""
    from npft_gguf import llamacpp
    from npft_gguf.sources import open_source

    llm = llamacpp.load(f32, n_ctx=64, vocab_only=True)
    lib = llamacpp._lib()
    add_bos = bool(lib.llama_vocab_get_add_bos(lib.llama_model_get_vocab(llm._model.model)))
    theirs = llamacpp.tokenize(llm, text, add_bos=add_bos)[:n]
    tok = open_source("smollm2-135m").tokenizer()
    ours = tok(text, add_special_tokens=add_bos)["input_ids"][:n]
    first = next((i for i, (x, y) in enumerate(zip(ours, theirs)) if x != y), None)
    return {"compared": min(len(ours), len(theirs)), "equal": ours == theirs, "first_difference": first, "add_bos": add_bos}


def lscpu_model() -> str | None:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    for line in out.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return None


def markdown(r: dict) -> str:
    im, m = r["imatrix"], r["machine"]
    L = ["# Importance matrix parity with llama.cpp (SmolLM2-135M)", "",
         f"Built by `{r['command']}` on {r['date']} ({m['lscpu_model'] or m['cpu']}, {m['cores_usable']} usable cores, "
         f"shared with other jobs; npft-gguf {r['git']}, llama-cpp-python {r['versions'].get('llama-cpp-python')}, "
         "llama-imatrix and llama-quantize built from its sdist by evals/llamacpp_tools.py)."
         + (f" {r['note']}" if r.get("note") else ""), "",
         f"Calibration: the first {r['settings']['chars']:,} characters of the `wiki` calibration text, "
         f"{r['settings']['chunks']} windows of {r['settings']['ctx']} tokens; the model is our F32 export of the demo.", "",
         "## Quantization: `npft-gguf export --imatrix` vs `llama-quantize --imatrix`", "",
         "Same F32 weights, same imatrix (llama-imatrix's file). Every tensor's type and data bytes compared; the sha256 "
         "is over every tensor's name, type and data in name order (llama-quantize writes the tensors sorted by name, we "
         "in the source's order; the whole files also differ in metadata: our provenance keys).", "",
         "| type | tensors | types in the file | tensors differing | tensor-data sha256 | ours s | llama-quantize s |",
         "|---|---|---|---|---|---|---|"]

    def sha(c):
        same = c["data_sha256_ours"] == c["data_sha256_llama_quantize"]
        return c["data_sha256_ours"][:16] + ("… (both)" if same else f"… vs {c['data_sha256_llama_quantize'][:16]}…")

    for t, c in r["quantize"].items():
        types = ", ".join(f"{k} x{v}" for k, v in c["types"].items())
        L.append(f"| {t} | {c['tensors']} | {types} | {len(c['tensors_differing'])} | {sha(c)} | {c['seconds_ours']:.0f} | "
                 f"{c['seconds_llama']:.0f} |")
    if r.get("cross"):
        L += ["", "With **our** imatrix file instead (`npft-gguf imatrix`; llama-quantize reads it), and how far quantizing "
              "with it differs from quantizing with llama-imatrix's:", "",
              "| type | tensors differing from llama-quantize | tensor-data sha256 | blocks equal to the llama-imatrix-file "
              "quantization | tensors equal to it |", "|---|---|---|---|---|"]
        for t, c in r["cross"].items():
            ag = c.get("vs_llama_imatrix_file", {})
            L.append(f"| {t} | {len(c['tensors_differing'])} | {sha(c)} | {ag.get('blocks_equal_pct', float('nan')):.2f} % | "
                     f"{ag.get('tensors_equal', '?')} / {ag.get('tensors', '?')} |")
    L += ["", "## The importance matrix: `npft-gguf imatrix` (torch) vs `llama-imatrix`", "",
          f"- entries: ours {im['entries_ours']}, llama-imatrix {im['entries_llama_imatrix']}; missing on either side: "
          f"{len(im['missing'])}",
          f"- token counts per entry equal: {im['counts_equal']} (chunk count {im['chunk_count'][0]} / {im['chunk_count'][1]}, "
          f"chunk size {im['chunk_size'][0]} / {im['chunk_size'][1]})",
          f"- sums, relative L2 difference per tensor: median {im['rel_l2_median']:.2e}, max {im['rel_l2_max']:.2e} "
          f"({im['rel_l2_worst_tensor']}); largest elementwise relative difference {im['max_rel_max']:.2e}",
          f"- tokens: llama.cpp's tokenizer and the HF tokenizer agree on the first {r['tokens']['compared']} tokens: "
          f"{r['tokens']['equal']} (add BOS: {r['tokens']['add_bos']})",
          f"- wall time: ours {r['seconds']['imatrix_ours']:.0f} s (torch, float32), llama-imatrix "
          f"{r['seconds']['imatrix_llama']:.0f} s", "",
          "The sums differ by float rounding only: llama-imatrix adds x^2 token by token in float32 over ggml's "
          "activations, ours adds torch's activations in float64. A scale search flips on tiny differences in its "
          "weights, so the two files give slightly different bytes (the table above).", ""]
    return "\n".join(L)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--chunks", type=int, default=64)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--chars", type=int, default=1_000_000, help="characters of the wiki calibration text written for both tools")
    ap.add_argument("--types", default=",".join(TYPES))
    ap.add_argument("--cross-types", default="q4_0", help="types also compared with our imatrix file ('' to skip)")
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--work", type=Path, default=HERE / "out" / "imatrix_parity")
    ap.add_argument("--md", type=Path, default=HERE / "IMATRIX_PARITY.md")
    ap.add_argument("--compare-only", action="store_true",
                    help="run nothing: compare the files a previous run left in --work (its timings kept)")
    a = ap.parse_args(argv)

    work = a.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    f32, calib = work / "f32.gguf", work / "calib-wiki.txt"
    theirs_im, ours_im = work / "theirs.imatrix.gguf", work / "ours.imatrix.gguf"
    types = [x for x in a.types.split(",") if x]
    cross = [x for x in a.cross_types.split(",") if x]
    if a.compare_only:
        prev = json.loads((work / "results.json").read_text())
        seconds, text = prev["seconds"], calib.read_text(encoding="utf-8")
        times = {(tag, t): (c["seconds_ours"], c["seconds_llama"]) for tag, key in (("theirs-im", "quantize"), ("ours-im", "cross"))
                 for t, c in prev[key].items()}
        command, date, git = prev["command"], prev["date"], prev["git"]
        note = f"Comparisons recomputed on {dt.date.today().isoformat()} from that run's files (`--compare-only`)."
    else:
        exe = tools(["llama-imatrix", "llama-quantize"])
        npft = npft_cmd()
        env = dict(os.environ, OMP_NUM_THREADS=str(a.threads))
        from npft_gguf.calib import calibration_text

        text = calibration_text("wiki")[: a.chars]
        calib.write_text(text, encoding="utf-8")
        seconds = {"export_f32": run("export-f32", [*npft, "export", "smollm2-135m", "-o", f32, "--type", "f32", "--force"], work, env)}
        seconds["imatrix_llama"] = run("llama-imatrix", [exe["llama-imatrix"], "-m", f32, "-f", calib, "-o", theirs_im, "-c", a.ctx,
                                                         "-b", a.ctx, "--chunks", a.chunks, "-t", a.threads, "--no-ppl"], work)
        seconds["imatrix_ours"] = run("npft-imatrix", [*npft, "imatrix", "smollm2-135m", "--calib", calib, "--ctx", a.ctx,
                                                       "--chunks", a.chunks, "--threads", a.threads, "-o", ours_im, "--force"], work, env)
        times = {}
        for tag, im, ts in (("theirs-im", theirs_im, types), ("ours-im", ours_im, cross)):
            for t in ts:
                lq, ours = work / f"llama-quantize-{tag}-{t}.gguf", work / f"ours-{tag}-{t}.gguf"
                s_l = run(f"llama-quantize-{tag}-{t}", [exe["llama-quantize"], "--imatrix", im, f32, lq, t.upper(), a.threads], work)
                s_o = run(f"export-{tag}-{t}", [*npft, "export", "smollm2-135m", "-o", ours, "--type", t, "--imatrix", im,
                                                "--force"], work, env)
                times[(tag, t)] = (s_o, s_l)
        command = "python evals/imatrix_parity.py " + " ".join(argv if argv is not None else sys.argv[1:])
        date, git, note = dt.date.today().isoformat(), git_rev(HERE.parent), None
    result = {"command": command.strip(), "date": date, "git": git, "note": note,
              "machine": {**machine_info(), "lscpu_model": lscpu_model()}, "versions": versions(),
              "settings": {"chunks": a.chunks, "ctx": a.ctx, "chars": len(text), "threads": a.threads},
              "tokens": compare_tokens(f32, text, a.chunks * a.ctx), "imatrix": compare_imatrix(ours_im, theirs_im),
              "seconds": seconds, "quantize": {}, "cross": {}}
    for tag, key, ts in (("theirs-im", "quantize", types), ("ours-im", "cross", cross)):
        for t in ts:
            c = compare_files(work / f"ours-{tag}-{t}.gguf", work / f"llama-quantize-{tag}-{t}.gguf")
            c["seconds_ours"], c["seconds_llama"] = times[(tag, t)]
            if tag == "ours-im" and (work / f"ours-theirs-im-{t}.gguf").is_file():
                c["vs_llama_imatrix_file"] = block_agreement(work / f"ours-{tag}-{t}.gguf", work / f"ours-theirs-im-{t}.gguf")
            log(f"{tag} {t}: {'IDENTICAL' if c['identical'] else str(len(c['tensors_differing'])) + ' tensors differ'}")
            result[key][t] = c
    (work / "results.json").write_text(json.dumps(result, indent=2))
    a.md.write_text(markdown(result))
    log(f"wrote {a.md} and {work / 'results.json'}")
    return 0 if all(c["identical"] for c in [*result["quantize"].values(), *result["cross"].values()]) else 1


if __name__ == "__main__":
    sys.exit(main())
