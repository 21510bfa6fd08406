"""Where a GPU is at hand (evals/gpu_check.sh selects these with `pytest -k cuda`; elsewhere they
skip): llama.cpp's offloaded evaluation gives the CPU's numbers, each run step's CUDA peaks are
measured, and convert offloads its guard and evaluation by default on a CUDA run."""

from __future__ import annotations

import json
import time

import pytest
import torch

from npft_gguf.llamacpp import gpu_offload_supported

CTX = 64
N_CHARS = 8_000

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
needs_gpu_build = pytest.mark.skipif(not (torch.cuda.is_available() and gpu_offload_supported()),
                                     reason="no CUDA device, or llama-cpp-python built without a GPU backend")


@needs_cuda
def test_cuda_measure_sees_torch_s_peak_and_the_device_s_memory_in_use():
    from npft_gguf.stages import measure

    with measure("cuda") as m:
        x = torch.ones(256 * 2**20, dtype=torch.uint8, device="cuda")
        time.sleep(4 * measure.SAMPLE_S)
        del x
    assert m["peak_device_bytes"] >= 256 * 2**20
    assert m["peak_device_used_bytes"] >= m["peak_device_bytes"]


@needs_gpu_build
def test_cuda_offloaded_evaluation_gives_the_cpu_s_numbers(tiny_bpe, wiki_text, tmp_path):
    from npft_gguf.sources import open_source
    from npft_gguf.validate.compare import compare
    from npft_gguf.validate.perplexity import EvalSettings
    from npft_gguf.writer import ExportSettings, export

    src = open_source(str(tiny_bpe))
    for t in ("f32", "q4_0"):
        export(src, tmp_path / f"{t}.gguf", ExportSettings(t, pure=True), progress=False)
    text = wiki_text[:N_CHARS]
    rows = {}
    for layers in (0, -1):
        rep = compare([tmp_path / "q4_0.gguf"], tmp_path / "f32.gguf", text, "wiki", EvalSettings(CTX), None,
                      progress=False, n_gpu_layers=layers)
        rows[layers] = next(r for r in rep["rows"] if r["file"].endswith("q4_0.gguf"))
    assert rows[-1]["eval_settings"]["n_gpu_layers"] == -1
    assert rows[-1]["ppl"] == pytest.approx(rows[0]["ppl"], rel=2e-3)
    assert rows[-1]["kld_mean"] == pytest.approx(rows[0]["kld_mean"], rel=0.1, abs=1e-4)


@needs_gpu_build
def test_cuda_convert_offloads_its_evaluation_and_measures_each_step_on_the_device(tiny_bpe, tmp_path):
    from tests.conftest import calib_text
    from tests.test_cli import cli
    from tests.test_convert import TINY

    (tmp_path / "calib.txt").write_text(calib_text(40_000))
    (tmp_path / "eval.txt").write_text(calib_text(200_000)[-30_000:])
    out = tmp_path / "tiny.gguf"
    r = cli("convert", tiny_bpe, "-o", out, "--calib", tmp_path / "calib.txt", *TINY, "--eval-text", tmp_path / "eval.txt",
            "--ctx", "64", "--eval-chunks", "4", "--device", "cuda", "--json")
    assert r.returncode == 0, r.stderr
    rec = json.loads(r.stdout)
    assert rec["convert"]["eval_gpu_layers"] == -1
    assert all(row["eval_settings"]["n_gpu_layers"] == -1 for row in rec["comparison"]["rows"])
    steps = {row["step"]: row for row in rec["stages"]}
    assert steps["tune"]["measured"]["peak_device_bytes"] > 0 and steps["tune"]["planned"]["peak_device_bytes"] > 0
    assert steps["evaluate"]["measured"]["peak_device_used_bytes"] > 0
    assert steps["evaluate"]["planned"]["peak_device_bytes"] > 0  # the plan put the offloaded evaluation on the GPU
