#!/usr/bin/env python3
"""`npft-gguf eval` beside llama.cpp's own `llama-perplexity`: same file, same text, same ctx.

Steps (idempotent; downloads and builds are cached under `npft_gguf.demo.cache_dir()`):

  1. llama.cpp's source tree from the llama-cpp-python 0.3.36 sdist (the version this package
     runs; fetched once with pip, sha256-checked), and only its `llama-perplexity` target built
     with CMake (Release, native CPU flags as llama-cpp-python's own build, no OpenSSL, no tests,
     examples or server). The build is skipped when the binary exists; its time is measured once
     and kept beside it.
  2. SmolLM2-135M as F32 and Q4_0 GGUF files, written by `npft-gguf export smollm2-135m`
     (skipped when the files exist).
  3. For each file and flash attention off (matched settings, checked) and on (for information):
       llama-perplexity -m FILE -f wiki.test.raw -c 512 --chunks N -t T -tb T -fa off|on
       npft-gguf eval FILE --text wiki.test.raw --ctx 512 --chunks N --threads T [--flash-attn]
     each in its own process, timed as a whole (wall clock, load and tokenization included); the
     eval loop alone is also read from each tool's own clock (llama-perplexity's log timestamps
     from "calculating perplexity" to "Final estimate"; `seconds` in our JSON).
  4. A table on stdout and <out-dir>/perplexity_vs_llamacpp.json (machine, date, versions,
     build info, per-run PPL, standard errors, times, logs' key lines).
  5. Exit status 1 when a matched-settings (fa off) relative PPL difference exceeds 0.1 %.

llama-perplexity runs with its defaults otherwise (n_batch 2048, so 4 windows of 512 share one
decode; n_ubatch 512; f16 KV cache); `npft-gguf eval` decodes one window at a time (n_batch =
n_ubatch = ctx, f16 KV cache). Both ask llama.cpp for the logits of positions ctx/2 .. ctx-1 only
and score ctx/2 .. ctx-2 of each window.

    python evals/perplexity_vs_llamacpp.py [--chunks 40] [--ctx 512] [--out-dir evals/out]
                                           [--threads T] [--repeat R]

Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WIKI: Path | None = None  # wiki.test.raw, found in main (texts.wikitext2_path: $NPFT_GGUF_WIKITEXT2 or ./wikitext-2-raw/)

SDIST_NAME = "llama-cpp-python"
SDIST_VERSION = "0.3.36"
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
TREE_IN_SDIST = f"llama_cpp_python-{SDIST_VERSION}/vendor/llama.cpp/"
TREE_SKIP = ("docs/", "models/", "media/")  # not needed to build the tool (vocab files, images)
TARGET = "llama-perplexity"
CMAKE_OPTIONS = [
    "-DCMAKE_BUILD_TYPE=Release",
    "-DLLAMA_BUILD_COMMON=ON",
    "-DLLAMA_BUILD_TOOLS=ON",  # tools/perplexity lives under tools/
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_SERVER=OFF",
    "-DLLAMA_BUILD_APP=OFF",
    "-DLLAMA_OPENSSL=OFF",  # this tree has no LLAMA_CURL any more (deprecated, ignored); no downloads needed
]

DEMO = "smollm2-135m"
TYPES = ("f32", "q4_0")
TOLERANCE_PCT = 0.1
RATIO_GOAL = 1.25
BUSY_CORES = 0.1  # CPU used by other processes during a run (in cores) above which the times are flagged as noisy


def log(msg: str) -> None:
    print(f"[ppl_vs_llamacpp] {msg}", file=sys.stderr, flush=True)


class EvalError(RuntimeError):
    pass


# ---------------------------------------------------------------------------------------------
# llama.cpp source and the llama-perplexity build


def source_tree(root: Path) -> Path:
    """vendor/llama.cpp of the llama-cpp-python sdist, fetched with pip and extracted once."""
    from npft_gguf.fetch import sha256

    tree = root / "llama.cpp"
    stamp = root / ".source-complete"
    if stamp.is_file() and (tree / "CMakeLists.txt").is_file():
        log(f"llama.cpp source: cached at {tree}")
        return tree
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        log(f"fetching {SDIST_NAME}=={SDIST_VERSION} sdist from PyPI (~76 MB) for llama.cpp's source")
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-d", tmp,
               f"{SDIST_NAME}=={SDIST_VERSION}"]
        done = subprocess.run(cmd, stdout=sys.stderr, stderr=subprocess.PIPE, text=True)
        sdists = list(Path(tmp).glob("*.tar.gz"))
        if done.returncode != 0 or not sdists:
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise EvalError(f"could not download the {SDIST_NAME}=={SDIST_VERSION} sdist ({last})")
        if sha256(sdists[0]) != SDIST_SHA256:
            raise EvalError(f"{sdists[0].name} does not have the expected sha256; refusing to use it")
        staging = Path(tmp) / "tree"
        with tarfile.open(sdists[0]) as tar:
            members = []
            for m in tar.getmembers():
                if not m.name.startswith(TREE_IN_SDIST) or not (m.isfile() or m.isdir()):
                    continue
                rel = m.name[len(TREE_IN_SDIST):]
                if not rel or rel.startswith(TREE_SKIP) or rel == ".git":  # .git: a dangling submodule link
                    continue
                m.name = rel
                members.append(m)
            try:
                tar.extractall(staging, members=members, filter="data")
            except TypeError:  # Python without extraction filters
                tar.extractall(staging, members=members)
        if not (staging / "tools" / "perplexity" / "perplexity.cpp").is_file():
            raise EvalError(f"{sdists[0].name} has no {TREE_IN_SDIST}tools/perplexity/perplexity.cpp")
        if tree.exists():
            shutil.rmtree(tree)
        staging.replace(tree)
    stamp.write_text(f"{sdists[0].name} {SDIST_SHA256}\n")
    log(f"llama.cpp source: extracted {sum(m.isfile() for m in members)} files into {tree}")
    return tree


def find_binary(build: Path) -> Path | None:
    for p in (build / "bin" / TARGET, build / TARGET):
        if p.is_file() and os.access(p, os.X_OK):
            return p
    return None


def build_perplexity(root: Path, jobs: int) -> tuple[Path, dict]:
    """The llama-perplexity binary (built once) and how it was built (time, options)."""
    build = root / "build"
    info_path = root / "build-info.json"
    exe = find_binary(build)
    if exe is not None:
        info = json.loads(info_path.read_text()) if info_path.is_file() else {}
        info["cached"] = True
        log(f"{TARGET}: cached at {exe} (built in {info.get('total_s', '?')} s)")
        return exe, info
    tree = source_tree(root)
    for tool in ("cmake", "c++"):
        if not shutil.which(tool):
            raise EvalError(f"building {TARGET} needs `{tool}` on PATH")
    gen = ["-G", "Ninja"] if shutil.which("ninja") else []
    nice = ["nice", "-n", "10"] if shutil.which("nice") else []
    configure = [*nice, "cmake", "-S", str(tree), "-B", str(build), *gen, *CMAKE_OPTIONS]
    compile_ = [*nice, "cmake", "--build", str(build), "--target", TARGET, "-j", str(jobs)]
    logs = root / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    times = {}
    for name, cmd in (("configure", configure), ("build", compile_)):
        log(f"{name}: {' '.join(cmd)}")
        t = time.perf_counter()
        with open(logs / f"{name}.log", "w") as f:
            rc = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT)
        times[name] = round(time.perf_counter() - t, 1)
        if rc != 0:
            tail = "\n".join((logs / f"{name}.log").read_text(errors="replace").splitlines()[-15:])
            raise EvalError(f"cmake {name} failed (exit {rc}); see {logs / f'{name}.log'}:\n{tail}")
        log(f"{name}: {times[name]} s")
    exe = find_binary(build)
    if exe is None:
        raise EvalError(f"the build finished but no {TARGET} binary is under {build}")
    info = {"configure_s": times["configure"], "build_s": times["build"],
            "total_s": round(times["configure"] + times["build"], 1), "jobs": jobs,
            "generator": "Ninja" if gen else "default", "cmake_options": CMAKE_OPTIONS, "niced": bool(nice),
            "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"), "cached": False}
    info_path.write_text(json.dumps(info, indent=2) + "\n")
    log(f"{TARGET}: built in {info['total_s']} s -> {exe}")
    return exe, info


# ---------------------------------------------------------------------------------------------
# running the two tools


def npft_cmd() -> list[str]:
    exe = Path(sys.executable).parent / "npft-gguf"
    if exe.is_file():
        return [str(exe)]
    found = shutil.which("npft-gguf")
    return [found] if found else [sys.executable, "-m", "npft_gguf.cli"]


def _cpu_busy_s() -> float | None:
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    except (OSError, ValueError, IndexError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def timed(cmd: list[str], log_path: Path) -> dict:
    """Run cmd (stdout+stderr to log_path); wall time, own CPU time, and other processes' CPU time."""
    busy0 = _cpu_busy_s()
    ru0 = os.times()
    t = time.perf_counter()
    with open(log_path, "w") as f:
        rc = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - t
    ru1 = os.times()
    busy1 = _cpu_busy_s()
    own = (ru1.children_user - ru0.children_user) + (ru1.children_system - ru0.children_system)
    others = None if busy0 is None or busy1 is None else max(0.0, (busy1 - busy0) - own)
    return {"rc": rc, "wall_s": round(wall, 2), "cpu_s": round(own, 2),
            "others_cpu_cores": round(others / wall, 2) if others is not None and wall > 0 else None}


def _last(pattern: str, text: str, flags=re.M):
    found = re.findall(pattern, text, flags)
    return found[-1] if found else None


def binary_version(exe: Path) -> str | None:
    try:
        done = subprocess.run([str(exe), "--version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return " / ".join(line.strip() for line in (done.stdout + done.stderr).splitlines() if line.strip()) or None


def run_llama_perplexity(exe: Path, model: Path, args, fa: str, log_path: Path) -> dict:
    cmd = [str(exe), "-m", str(model), "-f", str(WIKI), "-c", str(args.ctx), "--chunks", str(args.chunks),
           "-t", str(args.threads), "-tb", str(args.threads), "-fa", fa]
    r = timed(cmd, log_path)
    text = log_path.read_text(errors="replace")
    r["cmd"] = " ".join(cmd)
    m = _last(r"Final estimate: PPL = ([0-9.]+) \+/- ([0-9.]+)", text)
    if r["rc"] != 0 or not m:
        tail = "\n".join(text.splitlines()[-12:])
        raise EvalError(f"llama-perplexity failed on {model.name} (exit {r['rc']}); see {log_path}:\n{tail}")
    r["ppl"], r["ppl_se"] = float(m[0]), float(m[1])
    # its eval loop, from the log's timestamps (M.SS.mmm.uuu): "calculating perplexity ..." to "Final estimate"
    stamps = {}
    for key, pat in (("start", r"^(\d+)\.(\d+)\.(\d+)\.(\d+) I perplexity: calculating perplexity"),
                     ("end", r"^(\d+)\.(\d+)\.(\d+)\.(\d+) I Final estimate")):
        v = _last(pat, text)
        stamps[key] = int(v[0]) * 60 + int(v[1]) + int(v[2]) / 1e3 + int(v[3]) / 1e6 if v else None
    r["eval_loop_s"] = round(stamps["end"] - stamps["start"], 2) if None not in stamps.values() else None
    r["protocol_line"] = _last(r"calculating perplexity over .*$", text)
    r["system_info"] = _last(r"system_info: (.*)$", text)
    v = _last(r"tokenization took ([0-9.]+) ms", text)
    r["tokenize_s"] = round(float(v) / 1e3, 3) if v else None
    return r


def run_ours(model: Path, args, fa: str, json_path: Path, log_path: Path) -> dict:
    cmd = [*npft_cmd(), "eval", str(model), "--text", str(WIKI), "--ctx", str(args.ctx), "--chunks", str(args.chunks),
           "--threads", str(args.threads), "--flash-attn" if fa == "on" else "--no-flash-attn", "--json", str(json_path)]
    if json_path.exists():
        json_path.unlink()
    r = timed(cmd, log_path)
    r["cmd"] = " ".join(cmd)
    if r["rc"] != 0 or not json_path.is_file():
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-12:])
        raise EvalError(f"npft-gguf eval failed on {model.name} (exit {r['rc']}); see {log_path}:\n{tail}")
    res = json.loads(json_path.read_text())
    r.update(ppl=res["ppl"], ppl_se=res["ppl_se"], eval_loop_s=round(res["seconds"], 2), chunks=res.get("chunks"),
             scored=res.get("scored"), n_tokens_text=res.get("n_tokens_text"), settings=res.get("settings"))
    return r


# ---------------------------------------------------------------------------------------------
# reporting


def machine_info() -> dict:
    cpu = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_kb = None
    try:
        m = re.search(r"^MemTotal:\s+(\d+) kB", Path("/proc/meminfo").read_text(), re.M)
        mem_kb = int(m.group(1)) if m else None
    except OSError:
        pass
    return {
        "cpu": cpu or platform.processor() or None,
        "cores_logical": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "ram_gib": round(mem_kb / 2**20, 1) if mem_kb else None,
        "os": platform.platform(),
        "python": platform.python_version(),
    }


def versions(tree: Path | None) -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for dist in ("npft-gguf", "llama-cpp-python", "torch", "numpy"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = None
    try:
        import llama_cpp

        out["llama_cpp_python_system_info"] = llama_cpp.llama_print_system_info().decode(errors="replace").strip()
    except Exception:  # noqa: BLE001 - informational only
        pass
    if tree is not None and (tree / "ggml" / "CMakeLists.txt").is_file():
        txt = (tree / "ggml" / "CMakeLists.txt").read_text()
        parts = [re.search(rf"set\(GGML_VERSION_{k}\s+(\d+)\)", txt) for k in ("MAJOR", "MINOR", "PATCH")]
        if all(parts):
            out["ggml (vendored)"] = ".".join(p.group(1) for p in parts)
    try:
        rev = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain"], capture_output=True, text=True, check=True).stdout.strip()
        out["npft-gguf git"] = rev + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        pass
    return out


def rel_pct(ours: float, ref: float) -> float:
    return 100.0 * (ours - ref) / ref


def table(rows: list[dict]) -> str:
    head = ["file", "fa", "llama-perplexity PPL", "ours PPL", "diff %", "llama s", "ours s", "ratio", "llama loop s", "ours loop s", "loop ratio"]
    lines = []
    for r in rows:
        L, O = r["llama"], r["ours"]
        lines.append([r["file"], r["fa"], f"{L['ppl']:.4f} ± {L['ppl_se']:.4f}", f"{O['ppl']:.4f} ± {O['ppl_se']:.4f}",
                      f"{r['diff_pct']:+.4f}", f"{L['wall_s']:.1f}", f"{O['wall_s']:.1f}", f"{r['ratio']:.2f}x",
                      f"{L['eval_loop_s']:.1f}" if L.get("eval_loop_s") else "?", f"{O['eval_loop_s']:.1f}",
                      f"{r['loop_ratio']:.2f}x" if r.get("loop_ratio") else "?"])
    w = [max(len(h), *(len(x[i]) for x in lines)) for i, h in enumerate(head)]
    fmt = lambda cells: "| " + " | ".join(c.ljust(w[i]) for i, c in enumerate(cells)) + " |"  # noqa: E731
    return "\n".join([fmt(head), "|" + "|".join("-" * (n + 2) for n in w) + "|", *map(fmt, lines)])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--chunks", type=int, default=40, help="windows of --ctx tokens to score (default 40)")
    p.add_argument("--ctx", type=int, default=512, help="window length (default 512)")
    p.add_argument("--out-dir", type=Path, default=REPO / "evals" / "out", help="GGUF files, logs and the JSON (default evals/out)")
    p.add_argument("--threads", type=int, default=None, help="threads for both tools (default: all usable cores)")
    p.add_argument("--repeat", type=int, default=1, help="time each run this many times, keep the fastest (default 1)")
    p.add_argument("--build-jobs", type=int, default=2, help="parallel compile jobs for the one-time build (default 2)")
    args = p.parse_args(argv)
    args.threads = args.threads or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)

    sys.path.insert(0, str(REPO))
    from npft_gguf.demo import cache_dir
    from npft_gguf.texts import wikitext2_path

    global WIKI
    WIKI = wikitext2_path()  # llama-perplexity reads a file, so a local copy is needed
    if WIKI is None:
        raise EvalError("the WikiText-2 test text is missing: set NPFT_GGUF_WIKITEXT2 to a local wiki.test.raw")
    out = args.out_dir.resolve()
    logs = out / "perplexity_vs_llamacpp-logs"
    logs.mkdir(parents=True, exist_ok=True)
    root = cache_dir() / "llama.cpp-perplexity" / SDIST_VERSION

    # 1. llama-perplexity
    exe, build_info = build_perplexity(root, args.build_jobs)
    tree = root / "llama.cpp"

    # 2. the GGUF files, written by our exporter
    files = {}
    for t in TYPES:
        f = out / f"{DEMO}-{t}.gguf"
        if f.is_file():
            log(f"{f.name}: exists, kept")
        else:
            cmd = [*npft_cmd(), "export", DEMO, "-o", str(f), "--type", t]
            log(f"export: {' '.join(cmd)}")
            r = timed(cmd, logs / f"export-{t}.log")
            if r["rc"] != 0 or not f.is_file():
                raise EvalError(f"npft-gguf export failed for {t} (exit {r['rc']}); see {logs / f'export-{t}.log'}")
            log(f"export {t}: {r['wall_s']} s")
        files[t] = f

    # 3. both tools on each file, fa off (matched) then fa on (information)
    rows = []
    for fa in ("off", "on"):
        for t, f in files.items():
            best_l = best_o = None
            for k in range(args.repeat):
                tag = f"{t}-fa{fa}" + (f"-{k}" if args.repeat > 1 else "")
                log(f"{f.name}, fa {fa}: llama-perplexity ...")
                L = run_llama_perplexity(exe, f, args, fa, logs / f"llama-perplexity-{tag}.log")
                log(f"  PPL {L['ppl']:.4f} +/- {L['ppl_se']:.4f} in {L['wall_s']} s")
                log(f"{f.name}, fa {fa}: npft-gguf eval ...")
                O = run_ours(f, args, fa, logs / f"ours-{tag}.json", logs / f"ours-{tag}.log")
                log(f"  PPL {O['ppl']:.4f} +/- {O['ppl_se']:.4f} in {O['wall_s']} s (loop {O['eval_loop_s']} s)")
                best_l = L if best_l is None or L["wall_s"] < best_l["wall_s"] else best_l
                best_o = O if best_o is None or O["wall_s"] < best_o["wall_s"] else best_o
                for name, a, b in (("llama", best_l, L), ("ours", best_o, O)):
                    if abs(a["ppl"] - b["ppl"]) > 1e-9 * a["ppl"] + 1e-4:
                        log(f"  note: {name} PPL changed between repeats ({a['ppl']} vs {b['ppl']})")
            diff = rel_pct(best_o["ppl"], best_l["ppl"])
            rows.append({"file": f.name, "type": t, "fa": fa, "matched": fa == "off", "llama": best_l, "ours": best_o,
                         "diff_pct": round(diff, 5), "ratio": round(best_o["wall_s"] / best_l["wall_s"], 3),
                         "loop_ratio": round(best_o["eval_loop_s"] / best_l["eval_loop_s"], 3) if best_l.get("eval_loop_s") else None,
                         "within_tolerance": abs(diff) <= TOLERANCE_PCT})

    # 4. report
    print(table(rows))
    failed = [r for r in rows if r["matched"] and not r["within_tolerance"]]
    busy = [x for r in rows for x in (r["llama"]["others_cpu_cores"], r["ours"]["others_cpu_cores"]) if x is not None]
    print(f"\nthreads {args.threads}, ctx {args.ctx}, chunks {args.chunks}; tolerance {TOLERANCE_PCT} % (fa off rows); "
          f"time ratio goal <= {RATIO_GOAL}x (whole process, ours / llama-perplexity; "
          f"loop = first decode to final estimate, from each tool's own clock)")
    print(f"llama-perplexity: {exe} ({'cached build' if build_info.get('cached') else 'built now'}, "
          f"configure+build {build_info.get('total_s', '?')} s with -j {build_info.get('jobs', '?')})")
    if busy and max(busy) > BUSY_CORES:
        print(f"warning: other processes used up to {max(busy):.2f} cores during the runs; times are noisy")
    result = {
        "what": "npft-gguf eval vs llama.cpp llama-perplexity, same GGUF files, text and ctx",
        "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": machine_info(),
        "versions": {**versions(tree if tree.is_dir() else None),
                     "llama.cpp": f"vendor/llama.cpp of the {SDIST_NAME} {SDIST_VERSION} sdist (sha256 {SDIST_SHA256[:16]}...)",
                     "llama-perplexity --version": binary_version(exe),
                     "llama-perplexity system_info": rows[0]["llama"].get("system_info") if rows else None},
        "build": {**build_info, "binary": str(exe)},
        "settings": {"text": str(WIKI), "ctx": args.ctx, "chunks": args.chunks, "threads": args.threads,
                     "repeat": args.repeat, "tolerance_pct": TOLERANCE_PCT, "ratio_goal": RATIO_GOAL},
        "rows": rows,
        "ok": not failed,
    }
    json_path = out / "perplexity_vs_llamacpp.json"
    json_path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {json_path}")
    if failed:
        for r in failed:
            print(f"FAIL: {r['file']} fa {r['fa']}: ours {r['ours']['ppl']:.4f} vs llama-perplexity "
                  f"{r['llama']['ppl']:.4f} ({r['diff_pct']:+.4f} %, tolerance {TOLERANCE_PCT} %)")
        return 1
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except EvalError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)
