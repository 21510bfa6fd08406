#!/usr/bin/env python3
"""Wall time and peak RSS of `npft-gguf export ... --type q4_0` beside llama.cpp's own route.

Routes, each command in a fresh subprocess so that its peak RSS is its own:

  A   npft-gguf export smollm2-135m --type q4_0            (the demo: a Q4_1 GGUF source)
  A2  npft-gguf export <hf-dir> --type q4_0                 (the same model as a Hugging Face directory)
  B   llama.cpp: convert_hf_to_gguf.py <hf-dir> --outtype f16   (subprocess 1)
      then llama_model_quantize(f16 -> Q4_0)                    (subprocess 2)
      time = sum of the two, peak RSS = max of the two

A2 and B start from the same directory, so they compare like with like; A is what a user of the
demo runs. The Hugging Face directory is written once beforehand (not timed): the demo model,
dequantized to float32 (`save_pretrained` in float32; the converter then writes f16).

llama.cpp's converter and its own gguf-py come from the llama.cpp tree vendored in the
llama-cpp-python 0.3.36 sdist (fetched once with pip into the npft-gguf cache, sha256-checked,
and only the converter's files extracted). It runs with this interpreter, PYTHONPATH set to that
tree's gguf-py. The quantizer is llama.cpp's `llama_model_quantize` through llama-cpp-python
(`npft_gguf.llamacpp.quantize`).

Peak RSS and elapsed time come from GNU `/usr/bin/time -v` where present, else from a small
Python wrapper reading `getrusage(RUSAGE_CHILDREN)`. One run each.

    python evals/export_bench.py [--out-dir evals/out] [--keep]

Prints a table to stdout, progress to stderr, and writes <out-dir>/export_bench.json.
Without --keep the work directory (HF dir, f16 and Q4_0 files, logs) is deleted afterwards.
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

SDIST_NAME = "llama-cpp-python"
SDIST_VERSION = "0.3.36"
SDIST_FILE = f"llama_cpp_python-{SDIST_VERSION}.tar.gz"
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
TREE_IN_SDIST = f"llama_cpp_python-{SDIST_VERSION}/vendor/llama.cpp/"
# What convert_hf_to_gguf.py needs from the llama.cpp tree: itself, the conversion package it
# imports its model classes from, gguf-py (its own copy of the gguf package), and the chat
# templates some model classes read from models/templates.
TREE_MEMBERS = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/", "models/templates/", "LICENSE")
DEMO = "smollm2-135m"
QTYPE = "q4_0"
TEST_TEXT = "Hello world! 12345 The quick brown fox, naïve café 🦙\n\tdone."

BUSY_CORES = 0.2  # CPU used by other processes during a run (in cores) above which the table warns

GNU_TIME = Path("/usr/bin/time")
RUSAGE_WRAPPER = r"""
import json, resource, subprocess, sys, time
t = time.perf_counter()
rc = subprocess.call(sys.argv[2:])
wall = time.perf_counter() - t
ru = resource.getrusage(resource.RUSAGE_CHILDREN)
with open(sys.argv[1], "w") as f:
    json.dump({"rc": rc, "elapsed_s": wall, "max_rss_kb": ru.ru_maxrss, "user_s": ru.ru_utime, "sys_s": ru.ru_stime}, f)
"""


def log(msg: str) -> None:
    print(f"[export_bench] {msg}", file=sys.stderr, flush=True)


class BenchError(RuntimeError):
    pass


# ---------------------------------------------------------------------------------------------
# measuring one command


def _parse_gnu_time(text: str) -> dict:
    def field(label):
        m = re.search(rf"^\s*{re.escape(label)}.*?:\s*(\S+)\s*$", text, re.M)
        return m.group(1) if m else None

    elapsed = field("Elapsed (wall clock) time")
    secs = 0.0
    for part in elapsed.split(":"):  # h:mm:ss or m:ss.ss
        secs = secs * 60 + float(part)
    return {
        "elapsed_s": secs,
        "max_rss_kb": int(field("Maximum resident set size")),
        "user_s": float(field("User time (seconds)")),
        "sys_s": float(field("System time (seconds)")),
        "rc": int(field("Exit status")),
    }


def _cpu_busy_s() -> float | None:
    """Busy CPU seconds of the whole machine so far (all cores), from /proc/stat; None where unavailable."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    except (OSError, ValueError, IndexError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def measure(name: str, cmd: list[str], log_path: Path, env: dict | None = None, timer: str = "auto") -> dict:
    """Run cmd in a fresh process; its elapsed time, peak RSS and CPU times. Output goes to log_path."""
    use_gnu = timer == "gnu-time" or (timer == "auto" and GNU_TIME.is_file() and os.access(GNU_TIME, os.X_OK))
    with tempfile.NamedTemporaryFile("r", suffix=".time", delete=False) as tf:
        stats_path = Path(tf.name)
    try:
        if use_gnu:
            full = [str(GNU_TIME), "-v", "-o", str(stats_path), *cmd]
        else:
            full = [sys.executable, "-c", RUSAGE_WRAPPER, str(stats_path), *cmd]
        log(f"{name}: {' '.join(cmd)}")
        busy0 = _cpu_busy_s()
        t0 = time.perf_counter()
        with open(log_path, "w") as out:
            proc = subprocess.run(full, stdout=out, stderr=subprocess.STDOUT, env=env)
        outer = time.perf_counter() - t0
        busy1 = _cpu_busy_s()
        text = stats_path.read_text()
    finally:
        stats_path.unlink(missing_ok=True)
    if proc.returncode != 0:
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-15:])
        raise BenchError(f"{name} failed (exit {proc.returncode}); last lines of {log_path}:\n{tail}")
    stats = _parse_gnu_time(text) if use_gnu else json.loads(text)
    # CPU the rest of the machine used meanwhile, in cores: all busy CPU time less this command's own
    others = None if busy0 is None or busy1 is None else max(0.0, (busy1 - busy0) - stats["user_s"] - stats["sys_s"]) / max(outer, 1e-9)
    stats.update(timer="gnu-time" if use_gnu else "rusage", outer_wall_s=round(outer, 3),
                 other_load_cores=None if others is None else round(others, 2), log=str(log_path))
    log(f"{name}: {stats['elapsed_s']:.2f} s, peak RSS {stats['max_rss_kb'] / 1024:.0f} MiB"
        + (f", other processes used {others:.2f} cores meanwhile" if others is not None else ""))
    return stats


# ---------------------------------------------------------------------------------------------
# llama.cpp's converter, from the llama-cpp-python sdist


def llama_cpp_tree(cache: Path) -> Path:
    """The llama.cpp tree (converter, conversion/, gguf-py/) from the sdist, fetched and extracted once."""
    from npft_gguf.fetch import sha256

    root = cache / "llama.cpp-sdist" / SDIST_VERSION
    tree = root / "llama.cpp"
    stamp = root / ".complete"
    if stamp.is_file() and (tree / "convert_hf_to_gguf.py").is_file():
        log(f"llama.cpp converter: cached at {tree}")
        return tree
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        log(f"fetching {SDIST_NAME}=={SDIST_VERSION} sdist from PyPI (~76 MB) for llama.cpp's converter")
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-d", tmp,
               f"{SDIST_NAME}=={SDIST_VERSION}"]
        done = subprocess.run(cmd, stdout=sys.stderr, stderr=subprocess.PIPE, text=True)
        sdists = list(Path(tmp).glob("*.tar.gz"))
        if done.returncode != 0 or not sdists:
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise BenchError(f"could not download the {SDIST_NAME}=={SDIST_VERSION} sdist ({last})")
        if sha256(sdists[0]) != SDIST_SHA256:
            raise BenchError(f"{sdists[0].name} does not have the expected sha256; refusing to use it")
        staging = Path(tmp) / "tree"
        n = 0
        with tarfile.open(sdists[0]) as tar:
            members = []
            for m in tar.getmembers():
                if not m.name.startswith(TREE_IN_SDIST) or not (m.isfile() or m.isdir()):
                    continue
                rel = m.name[len(TREE_IN_SDIST):]
                if not any(rel == p or rel.startswith(p) for p in TREE_MEMBERS):
                    continue
                m.name = rel
                members.append(m)
            n = sum(m.isfile() for m in members)
            try:
                tar.extractall(staging, members=members, filter="data")
            except TypeError:  # Python without extraction filters
                tar.extractall(staging, members=members)
        if not (staging / "convert_hf_to_gguf.py").is_file():
            raise BenchError(f"{sdists[0].name} has no {TREE_IN_SDIST}convert_hf_to_gguf.py")
        if tree.exists():
            shutil.rmtree(tree)
        staging.replace(tree)
    stamp.write_text(f"{SDIST_FILE} {SDIST_SHA256}\n")
    log(f"llama.cpp converter: extracted {n} files into {tree}")
    return tree


def converter_env(tree: Path) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(tree / "gguf-py"), *filter(None, [env.get("PYTHONPATH")])])
    return env


def check_converter_imports(tree: Path) -> dict:
    """Import what the converter imports, with its environment; name any missing package."""
    code = (
        "import sys, json; sys.path.insert(0, sys.argv[1])\n"
        "try:\n"
        "    import gguf, conversion, conversion.llama\n"
        "    print(json.dumps({'ok': True, 'gguf_file': gguf.__file__}))\n"
        "except ModuleNotFoundError as e:\n"
        "    print(json.dumps({'ok': False, 'missing': e.name, 'error': str(e)}))\n"
        "except Exception as e:\n"
        "    print(json.dumps({'ok': False, 'missing': None, 'error': f'{type(e).__name__}: {e}'}))\n"
    )
    done = subprocess.run([sys.executable, "-c", code, str(tree)], capture_output=True, text=True, env=converter_env(tree))
    try:
        info = json.loads(done.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        info = {"ok": False, "missing": None, "error": (done.stderr.strip().splitlines() or ["no output"])[-1]}
    m = re.search(r'^version\s*=\s*"([^"]+)"', (tree / "gguf-py" / "pyproject.toml").read_text(), re.M)
    info["gguf_py_version"] = m.group(1) if m else None
    if info.get("ok"):
        info["uses_tree_gguf_py"] = Path(info["gguf_file"]).resolve().is_relative_to((tree / "gguf-py").resolve())
    return info


# ---------------------------------------------------------------------------------------------
# the shared Hugging Face directory


def materialize_hf_dir(hf_dir: Path) -> dict:
    """The demo model as a float32 Hugging Face directory (weights + tokenizer)."""
    import torch

    from npft_gguf.sources import open_source

    src = open_source(DEMO)
    model = src.load_model(dtype=torch.float32)
    tok = src.tokenizer()  # sources already restored the 'smollm' pre-tokenizer (fix_pre_tokenizer)
    if hf_dir.exists():
        shutil.rmtree(hf_dir)
    model.save_pretrained(hf_dir)
    tok.save_pretrained(hf_dir)
    size = sum(f.stat().st_size for f in hf_dir.iterdir() if f.is_file())
    return {"path": str(hf_dir), "dtype": "float32", "bytes": size, "source_gguf": str(src.path),
            "pre_tokenizer": str(tok.backend_tokenizer.pre_tokenizer)}


# ---------------------------------------------------------------------------------------------
# the outputs


def tensor_types(path: Path) -> dict[str, str]:
    from gguf import GGUFReader

    return {t.name: t.tensor_type.name for t in GGUFReader(path).tensors}


def gguf_str(path: Path, key: str):
    from gguf import GGUFReader

    f = GGUFReader(path).fields.get(key)
    return None if f is None else f.contents()


def type_counts(types: dict[str, str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for t in types.values():
        out[t] = out.get(t, 0) + 1
    return dict(sorted(out.items()))


def compare_types(ours: dict[str, str], theirs: dict[str, str]) -> dict:
    diff = {n: {"ours": ours.get(n), "llama.cpp": theirs.get(n)}
            for n in sorted(set(ours) | set(theirs)) if ours.get(n) != theirs.get(n)}
    return {"agree": not diff, "n_differ": len(diff), "differ": diff}


def load_check(path: Path) -> dict:
    from npft_gguf import llamacpp

    try:
        llm = llamacpp.load(path, n_ctx=128, logits_all=False)
    except Exception as e:  # noqa: BLE001 - report, do not stop the benchmark
        return {"loads": False, "error": str(e)}
    toks = llamacpp.tokenize(llm, TEST_TEXT)
    del llm
    return {"loads": True, "test_tokens": toks}


# ---------------------------------------------------------------------------------------------


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


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for dist in ("npft-gguf", "torch", "transformers", "gguf", "llama-cpp-python", "safetensors", "tokenizers"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = None
    return out


def git_rev(repo: Path) -> str | None:
    try:
        rev = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain"], capture_output=True, text=True, check=True).stdout.strip()
        return rev + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return None


def npft_cmd() -> list[str]:
    exe = Path(sys.executable).parent / "npft-gguf"
    if exe.is_file():
        return [str(exe)]
    found = shutil.which("npft-gguf")
    return [found] if found else [sys.executable, "-m", "npft_gguf.cli"]


def ratio(a: float, b: float) -> float | None:
    return round(a / b, 3) if b else None


def main(argv: list[str] | None = None) -> int:
    here = Path(__file__).resolve().parent
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out-dir", type=Path, default=here / "out", help="where export_bench.json (and the work dir) go")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (HF dir, GGUF files, logs)")
    ap.add_argument("--timer", choices=["auto", "gnu-time", "rusage"], default="auto", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    t_start = time.perf_counter()
    from npft_gguf import demo

    out_dir = args.out_dir.resolve()
    work = out_dir / "export_bench-work"
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    cache = demo.cache_dir()

    # -- preparation, not timed ------------------------------------------------------------
    log(f"demo model: {demo.fetch(DEMO)}")
    tree = llama_cpp_tree(cache)
    imports = check_converter_imports(tree)
    if not imports["ok"]:
        hint = f"missing package: {imports['missing']}" if imports.get("missing") else imports["error"]
        raise BenchError(f"llama.cpp's converter does not import in this environment ({hint})")
    log(f"converter imports; gguf-py {imports['gguf_py_version']} from {imports['gguf_file']}")
    hf_dir = work / "hf-float32"
    log(f"writing the demo as a float32 Hugging Face directory: {hf_dir}")
    hf = materialize_hf_dir(hf_dir)

    # -- the routes, one run each, each command its own process -------------------------------
    npft = npft_cmd()
    out_a, out_a2 = work / "A-npft-demo-q4_0.gguf", work / "A2-npft-hf-q4_0.gguf"
    f16, out_b = work / "B-llamacpp-f16.gguf", work / "B-llamacpp-q4_0.gguf"
    runs = {}
    runs["A"] = measure("A  npft-gguf export (demo GGUF)", [*npft, "export", DEMO, "-o", str(out_a), "--type", QTYPE, "--force"],
                        work / "A.log", timer=args.timer)
    runs["A2"] = measure("A2 npft-gguf export (HF dir)", [*npft, "export", str(hf_dir), "-o", str(out_a2), "--type", QTYPE, "--force"],
                         work / "A2.log", timer=args.timer)
    runs["B1"] = measure("B1 convert_hf_to_gguf.py --outtype f16",
                         [sys.executable, str(tree / "convert_hf_to_gguf.py"), str(hf_dir), "--outtype", "f16", "--outfile", str(f16)],
                         work / "B1-convert.log", env=converter_env(tree), timer=args.timer)
    quant = ("import sys; from pathlib import Path; from npft_gguf.llamacpp import quantize; "
             f"quantize(Path(sys.argv[1]), Path(sys.argv[2]), {QTYPE!r})")
    runs["B2"] = measure("B2 llama_model_quantize f16 -> Q4_0", [sys.executable, "-c", quant, str(f16), str(out_b)],
                         work / "B2-quantize.log", timer=args.timer)
    route_b = {
        "elapsed_s": round(runs["B1"]["elapsed_s"] + runs["B2"]["elapsed_s"], 3),
        "max_rss_kb": max(runs["B1"]["max_rss_kb"], runs["B2"]["max_rss_kb"]),
        "user_s": round(runs["B1"]["user_s"] + runs["B2"]["user_s"], 3),
        "sys_s": round(runs["B1"]["sys_s"] + runs["B2"]["sys_s"], 3),
    }
    conv_log = Path(runs["B1"]["log"]).read_text(errors="replace")
    conv_warnings = sorted({ln.strip() for ln in conv_log.splitlines() if ln.startswith("WARNING")})

    # -- the outputs ---------------------------------------------------------------------------
    log("checking the Q4_0 files in llama.cpp and comparing tensor types")
    files = {"A": out_a, "A2": out_a2, "B": out_b}
    types = {k: tensor_types(p) for k, p in files.items()}
    loads = {k: load_check(p) for k, p in files.items()}
    outputs = {
        k: {"path": str(p), "bytes": p.stat().st_size, "types": type_counts(types[k]), "tokenizer_pre": gguf_str(p, "tokenizer.ggml.pre"),
            "llama_cpp_loads": loads[k]["loads"], **({"load_error": loads[k]["error"]} if not loads[k]["loads"] else {})}
        for k, p in files.items()
    }
    outputs["B_f16"] = {"path": str(f16), "bytes": f16.stat().st_size, "types": type_counts(tensor_types(f16)),
                        "tokenizer_pre": gguf_str(f16, "tokenizer.ggml.pre")}
    toks = {k: v.get("test_tokens") for k, v in loads.items()}
    checks = {
        "types_A_vs_B": compare_types(types["A"], types["B"]),
        "types_A2_vs_B": compare_types(types["A2"], types["B"]),
        "same_tokenization_A2_B": toks["A2"] is not None and toks["A2"] == toks["B"],
        "same_tokenization_A_B": toks["A"] is not None and toks["A"] == toks["B"],
        "test_text": TEST_TEXT,
    }

    ratios = {
        "A_over_B": {"time": ratio(runs["A"]["elapsed_s"], route_b["elapsed_s"]), "peak_rss": ratio(runs["A"]["max_rss_kb"], route_b["max_rss_kb"])},
        "A2_over_B": {"time": ratio(runs["A2"]["elapsed_s"], route_b["elapsed_s"]), "peak_rss": ratio(runs["A2"]["max_rss_kb"], route_b["max_rss_kb"])},
    }
    goal = {k: (v["time"] is not None and v["time"] <= 1.0, v["peak_rss"] is not None and v["peak_rss"] <= 1.0) for k, v in ratios.items()}

    result = {
        "benchmark": "export_bench",
        "date_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "versions": {**versions(), "llama.cpp_tree": f"{SDIST_NAME} {SDIST_VERSION} sdist, vendor/llama.cpp",
                     "llama.cpp_gguf_py": imports["gguf_py_version"], "npft_gguf_git": git_rev(here.parent)},
        "model": DEMO,
        "type": QTYPE,
        "hf_dir": hf,
        "converter": {"tree": str(tree), "imports": imports, "outtype": "f16", "warnings": conv_warnings},
        "timer": runs["A"]["timer"],
        "runs": {k: {kk: vv for kk, vv in v.items() if kk != "log"} for k, v in runs.items()},
        "route_B": route_b,
        "ratios": ratios,
        "goal_time_and_rss_at_most_1x": {k: {"time": t, "peak_rss": r} for k, (t, r) in goal.items()},
        "outputs": outputs,
        "checks": checks,
        "bench_runtime_s": None,
        "work_dir": str(work) if args.keep else None,
    }

    # -- report --------------------------------------------------------------------------------
    def mib(kb):
        return kb / 1024

    rows = [
        ("A   npft-gguf export smollm2-135m (GGUF source)", runs["A"]["elapsed_s"], mib(runs["A"]["max_rss_kb"]), out_a.stat().st_size),
        ("A2  npft-gguf export <hf-dir>", runs["A2"]["elapsed_s"], mib(runs["A2"]["max_rss_kb"]), out_a2.stat().st_size),
        ("B1  convert_hf_to_gguf.py --outtype f16", runs["B1"]["elapsed_s"], mib(runs["B1"]["max_rss_kb"]), f16.stat().st_size),
        ("B2  llama_model_quantize f16 -> Q4_0", runs["B2"]["elapsed_s"], mib(runs["B2"]["max_rss_kb"]), out_b.stat().st_size),
        ("B   llama.cpp route (B1 + B2; RSS max)", route_b["elapsed_s"], mib(route_b["max_rss_kb"]), out_b.stat().st_size),
    ]
    mc = result["machine"]
    lines = [
        f"export_bench: {DEMO} -> {QTYPE.upper()}, one run each, {mc['cpu']}, {mc['cores_usable']} cores, {mc['ram_gib']} GiB RAM",
        f"{'route':<50} {'time s':>8} {'peak RSS MiB':>13} {'output MB':>10}",
    ]
    lines += [f"{name:<50} {t:>8.2f} {r:>13.0f} {s / 1e6:>10.1f}" for name, t, r, s in rows]
    for key, label in (("A_over_B", "A  / B"), ("A2_over_B", "A2 / B")):
        r = ratios[key]
        ok = goal[key]
        lines.append(f"ratio {label}: time {r['time']:.2f}x ({'ok' if ok[0] else 'over'}), peak RSS {r['peak_rss']:.2f}x "
                     f"({'ok' if ok[1] else 'over'})   goal <= 1.00x each")
    for key, label in (("types_A_vs_B", "A  vs B"), ("types_A2_vs_B", "A2 vs B")):
        c = checks[key]
        if c["agree"]:
            lines.append(f"tensor types {label}: agree")
        else:
            shown = ", ".join(f"{n} {d['ours']}/{d['llama.cpp']}" for n, d in list(c["differ"].items())[:6])
            more = " ..." if c["n_differ"] > 6 else ""
            lines.append(f"tensor types {label}: {c['n_differ']} differ (ours/llama.cpp): {shown}{more}")
    busy = {k: v["other_load_cores"] for k, v in runs.items() if (v["other_load_cores"] or 0) > BUSY_CORES}
    if busy:
        lines.append("WARNING: other processes were using CPU during " + ", ".join(f"{k} ({v:.2f} cores)" for k, v in busy.items())
                     + f" of {mc['cores_usable']}; times are not reliable, run again on a quiet machine")
    lines.append("llama.cpp loads: " + ", ".join(f"{k} {'yes' if outputs[k]['llama_cpp_loads'] else 'NO'}" for k in files)
                 + f"; same tokens for a test string A2/B: {'yes' if checks['same_tokenization_A2_B'] else 'NO'}, "
                 f"A/B: {'yes' if checks['same_tokenization_A_B'] else 'NO'}")

    result["bench_runtime_s"] = round(time.perf_counter() - t_start, 1)
    json_path = out_dir / "export_bench.json"
    json_path.write_text(json.dumps(result, indent=2) + "\n")
    print("\n".join(lines))
    print(f"wrote {json_path} (benchmark took {result['bench_runtime_s']:.0f} s in all)")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchError as e:
        print(f"export_bench: {e}", file=sys.stderr)
        sys.exit(1)
