"""The plan of a convert run: each stage's memory, disk and time from the config alone (stages.py),
`npft-gguf plan` and `convert --dry-run`, and convert refusing a run that cannot fit."""

from __future__ import annotations

import json
import math

import pytest
import torch

from npft_gguf import stages
from npft_gguf.errors import UsageError
from npft_gguf.stages import GiB, Dims, Machine, parse_size

from .test_cli import assert_fails, run

DEFAULT_STAGES = ["imatrix", "source", "calibration", "sensitivity", "trace", "tune", "merge", "write", "guard", "evaluate"]
FIGURES = ("peak_device_bytes", "peak_host_bytes", "disk_bytes", "seconds")


def real_config(name: str):
    """The public hyperparameters of three 7-8B models, as transformers configs (no weights)."""
    from transformers import LlamaConfig, Qwen2Config

    if name == "llama-2-7b":
        return LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                           num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5,
                           architectures=["LlamaForCausalLM"])
    if name == "llama-3.1-8b":
        return LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                           num_key_value_heads=8, vocab_size=128256, max_position_embeddings=131072, rms_norm_eps=1e-5,
                           rope_theta=500000.0, bos_token_id=128000, eos_token_id=128001,
                           rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
                           architectures=["LlamaForCausalLM"])
    return Qwen2Config(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                       num_key_value_heads=4, vocab_size=152064, max_position_embeddings=32768, rope_theta=1e6,
                       rms_norm_eps=1e-6, tie_word_embeddings=False, architectures=["Qwen2ForCausalLM"])


PARAMS = {"llama-2-7b": 6.74e9, "llama-3.1-8b": 8.03e9, "qwen2.5-7b": 7.62e9}  # the models' published sizes


def llama_70b_config():
    """Llama-3.1-70B's public hyperparameters (70.6e9 parameters)."""
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                       num_key_value_heads=8, vocab_size=128256, max_position_embeddings=131072, rms_norm_eps=1e-5,
                       rope_theta=500000.0, bos_token_id=128000, eos_token_id=128001,
                       rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                     "original_max_position_embeddings": 8192},
                       architectures=["LlamaForCausalLM"])


@pytest.fixture(scope="module")
def configs(tmp_path_factory):
    """A config.json folder (nothing else) per model."""
    root = tmp_path_factory.mktemp("configs")
    for name in PARAMS:
        real_config(name).save_pretrained(root / name)
    return root


def plan_json(folder, tmp_path, *args):
    r = run("plan", folder, "-o", tmp_path / "out.gguf", "--eval-text", "wiki-heldout", "--json", *args)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


@pytest.mark.parametrize("name", list(PARAMS))
def test_plan_lists_each_stage_with_its_four_figures(configs, tmp_path, name):
    d = plan_json(configs / name, tmp_path, "--gpu-memory", "80GiB", "--host-memory", "64GiB")
    assert [s["name"] for s in d["stages"]] == DEFAULT_STAGES
    for s in d["stages"]:
        assert all(isinstance(s[k], (int, float)) and s[k] >= 0 for k in FIGURES), s
    assert d["peak_device_bytes"] == max(s["peak_device_bytes"] for s in d["stages"])
    assert d["peak_host_bytes"] == max(s["peak_host_bytes"] for s in d["stages"])
    assert d["disk_bytes"] == sum(s["disk_bytes"] for s in d["stages"])
    assert d["seconds"] == pytest.approx(sum(s["seconds"] for s in d["stages"]))
    by = {s["name"]: s for s in d["stages"]}
    n = PARAMS[name]
    assert by["merge"]["peak_device_bytes"] == pytest.approx(2 * n + stages.CUDA_CONTEXT, rel=0.02)  # merged in place, bf16
    assert by["source"]["peak_device_bytes"] == pytest.approx(2 * n, rel=0.02)  # bf16 on CUDA
    assert by["write"]["disk_bytes"] == pytest.approx(n * 4.6 / 8, rel=0.1)  # about 4.5-4.7 bits per weight in q4_0
    assert by["tune"]["seconds"] > 60 and by["sensitivity"]["seconds"] > 10
    assert d["device"] == "cuda" and d["steps"] == ["imatrix", "source", "calibration", "tune", "write", "guard", "evaluate"]


# what the plan switches on for a 24 GiB GPU, per model (docs/METHOD.md, "Memory of the tuning")
ON_24GB = {"llama-2-7b": {"gradient_checkpointing": True, "fisher_stages": 3, "trace_len": 256},
           "llama-3.1-8b": {"gradient_checkpointing": True, "fisher_stages": 4, "trace_len": 256},
           "qwen2.5-7b": {"gradient_checkpointing": True, "fisher_stages": 4, "trace_len": 256}}


@pytest.mark.parametrize("name", list(PARAMS))
def test_the_default_convert_of_a_7_8b_model_fits_a_24gb_gpu(configs, tmp_path, name):
    """The plan switches on checkpointing, the fewest Fisher passes and a shorter trace that fit
    24 GiB; on an 80 GB GPU it switches on nothing."""
    d = plan_json(configs / name, tmp_path, "--gpu-memory", "24GiB", "--host-memory", "64GiB")
    assert d["fits"] is True and d["fitted_by_plan"] == ON_24GB[name]
    assert d["peak_device_bytes"] <= 24 * GiB
    d = plan_json(configs / name, tmp_path, "--gpu-memory", "80GiB", "--host-memory", "128GiB")
    assert d["fits"] is True and d["fitted_by_plan"] == {}


def test_the_plan_overrides_no_option_the_user_gave(configs, tmp_path):
    """--fisher-stages 1 given: kept, and the run refused with the number of passes that fits;
    --no-gradient-checkpointing and --trace-len 512 given: kept, their stages refused."""
    d = plan_json(configs / "llama-3.1-8b", tmp_path, "--gpu-memory", "24GiB", "--host-memory", "64GiB",
                  "--fisher-stages", "1")
    assert d["fits"] is False and d["refused"] is True and "fisher_stages" not in d["fitted_by_plan"]
    by = {s["name"]: s for s in d["stages"]}
    assert by["sensitivity"]["fix"] == "--fisher-stages 4" and by["tune"]["fix"] is None
    d = plan_json(configs / "llama-2-7b", tmp_path, "--gpu-memory", "24GiB", "--host-memory", "64GiB",
                  "--no-gradient-checkpointing", "--trace-len", "512")
    assert d["fits"] is False and d["fitted_by_plan"] == {"fisher_stages": 4}  # the Fisher passes fit without checkpointing
    by = {s["name"]: s for s in d["stages"]}
    assert by["tune"]["fix"] == "--gradient-checkpointing" and by["trace"]["fix"] == "--trace-len 256"


def test_the_run_gets_the_settings_the_plan_chose_and_convert_refuses_what_cannot_fit(configs, tmp_path):
    """plan_convert decides from the config and the machine: the NPFTSettings the run tunes with are
    the adjusted ones, said in the notes logged before the run; with --fisher-stages left to the
    user (1), check_fits refuses the run, naming the stage."""
    from npft_gguf.calib import CalibSettings
    from npft_gguf.convert import ConvertSettings, check_fits, plan_convert
    from npft_gguf.npft import NPFTSettings

    gpu = Machine(24 * GiB, 64 * GiB, None)
    folder = str(configs / "llama-3.1-8b")

    def planned(**settings):
        return plan_convert(folder, tmp_path / "out.gguf", ConvertSettings(eval_text="none", **settings),
                            CalibSettings(samples=128, length=512), NPFTSettings(noise="rtn", objective="kl"), "cuda",
                            source=stages.open_for_plan(folder), costs_only=True, machine=gpu)

    plan = planned()
    assert (plan.npft.gradient_checkpointing, plan.npft.fisher_stages, plan.npft.trace_len) == (True, 4, 256)
    assert plan.fitted == ON_24GB["llama-3.1-8b"] and [n.split(" (")[0] for n in plan.notes[:3]] == [
        "plan: --gradient-checkpointing on", "plan: --fisher-stages 4", "plan: --trace-len 256"]
    assert check_fits(plan, gpu).fits
    plan = planned(fit_options=("gradient_checkpointing", "trace_len", "trace_samples"))
    assert plan.npft.fisher_stages == 1 and "fisher_stages" not in plan.fitted
    with pytest.raises(UsageError, match="cannot fit: stage sensitivity .* --fisher-stages 4 makes it fit"):
        check_fits(plan, gpu)


def test_gradient_checkpointing_and_batch_lower_the_tuning_step(configs, tmp_path):
    def tune(*args):
        d = plan_json(configs / "llama-3.1-8b", tmp_path, "--gpu-memory", "80GiB", "--host-memory", "64GiB", *args)
        return next(s for s in d["stages"] if s["name"] == "tune")["peak_device_bytes"]

    plain = tune("--batch", "8")
    assert tune("--batch", "8", "--gradient-checkpointing") < plain
    assert tune("--batch", "1") < plain


def test_plan_text_is_a_table_and_a_verdict(configs, tmp_path):
    r = run("plan", configs / "llama-2-7b", "-o", tmp_path / "out.gguf", "--eval-text", "wiki-heldout",
            "--gpu-memory", "24GiB", "--host-memory", "64GiB")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    for name in DEFAULT_STAGES:
        assert f"\n{name}" in out
    assert "GPU peak" in out and "host peak" in out and "disk" in out and "time" in out
    assert "verdict: fits" in out and "\nplan: --gradient-checkpointing on (tune: 33 GiB without, 15 GiB with)\n" in out
    assert "\nplan: --fisher-stages 3 (sensitivity: 38 GiB in one pass, 22 GiB in 3)\n" in out
    assert "GPU 24.0 GiB free, host 64.0 GiB available" in out
    assert not (tmp_path / "out.gguf").exists()


def test_plan_of_gptq_and_rtn_have_their_own_stages(configs, tmp_path):
    d = plan_json(configs / "qwen2.5-7b", tmp_path, "--method", "gptq", "--host-memory", "64GiB", "--gpu-memory", "80GiB")
    assert [s["name"] for s in d["stages"]] == ["source", "calibration", "quantize", "write", "evaluate"]
    d = plan_json(configs / "qwen2.5-7b", tmp_path, "--method", "rtn", "--eval-text", "none")
    assert [s["name"] for s in d["stages"]] == ["write"] and d["device"] is None
    d = plan_json(configs / "qwen2.5-7b", tmp_path, "--method", "npft", "--type", "rtn3", "--gpu-memory", "80GiB")
    assert [s["name"] for s in d["stages"]] == ["source", "calibration", "sensitivity", "trace", "tune", "merge", "quantize",
                                                "evaluate"]
    assert next(s for s in d["stages"] if s["name"] == "evaluate")["where"] == "cuda"  # in torch: rtn3 has no GGUF form
    d = plan_json(configs / "qwen2.5-7b", tmp_path, "--method", "owq", "--gpu-memory", "80GiB")
    assert [s["name"] for s in d["stages"]] == ["source", "calibration", "quantize", "evaluate"]


def by_name(d: dict, name: str) -> dict:
    return next(s for s in d["stages"] if s["name"] == name)


GPU24 = ("--gpu-memory", "24GiB", "--host-memory", "64GiB", "--cpu-cores", "16")


def test_the_closing_evaluation_is_bounded_and_on_the_gpu_by_default(configs, tmp_path):
    """Issue 29 #3: the default evaluation runs EVAL_CHUNKS windows of each of its six files (the float
    model, RTN, the imatrix peer, the output, IQ4_NL and Q4_K_M), offloaded to the GPU of a CUDA run;
    the plan states its tokens and time from that bound. The whole text on the CPU made it most of the run."""
    from npft_gguf.choices import EVAL_CHUNKS

    d = plan_json(configs / "llama-2-7b", tmp_path, *GPU24)
    ev, guard = by_name(d, "evaluate"), by_name(d, "guard")
    assert ev["tokens"] == 6 * EVAL_CHUNKS * 512 and f"{EVAL_CHUNKS} windows each" in ev["what"]
    assert ev["where"] == guard["where"] == "llama.cpp (gpu)"
    assert 13 * GiB < ev["peak_device_bytes"] < 16 * GiB  # the F16 reference (13.5 GB) on the device, not the host
    assert ev["peak_host_bytes"] < 2 * GiB and ev["peak_device_bytes"] <= d["peak_device_bytes"]
    assert ev["seconds"] < 0.15 * d["seconds"] and d["hints"] == []
    on_cpu = plan_json(configs / "llama-2-7b", tmp_path, *GPU24, "--eval-gpu-layers", "0")
    cpu_ev = by_name(on_cpu, "evaluate")
    assert cpu_ev["where"] == "llama.cpp" and cpu_ev["peak_device_bytes"] == 0 and cpu_ev["tokens"] == ev["tokens"]
    assert cpu_ev["seconds"] > 10 * ev["seconds"] and cpu_ev["peak_host_bytes"] > 13 * GiB
    assert any("--eval-gpu-layers -1" in h for h in on_cpu["hints"])
    whole = plan_json(configs / "llama-2-7b", tmp_path, *GPU24, "--eval-gpu-layers", "0", "--eval-chunks", "all")
    all_ev = by_name(whole, "evaluate")
    assert all_ev["tokens"] > 4 * ev["tokens"] and all_ev["seconds"] > 0.5 * whole["seconds"]  # the run, before
    assert any(h.startswith("the closing evaluation takes most of the run") and "--eval-chunks" in h for h in whole["hints"])
    assert "the reference decoded once" in ev["what"] and "decoded again" not in ev["what"]


def test_the_plan_names_eval_gpu_layers_0_where_the_offloaded_evaluation_does_not_fit(configs, tmp_path):
    d = plan_json(configs / "llama-2-7b", tmp_path, "--method", "rtn", "--gpu-memory", "8GiB", "--host-memory", "64GiB")
    ev = by_name(d, "evaluate")
    assert d["fits"] is False and ev["fix"] == "--eval-gpu-layers 0"
    assert any("stage evaluate" in p and "--eval-gpu-layers 0 makes it fit" for p in d["problems"])


def test_a_reference_past_the_record_s_budget_is_planned_as_decoded_again(configs, tmp_path, monkeypatch):
    """Qwen2.5-7B's 152k vocabulary: the whole text's reference logits pass the record's 16 GiB, so
    the plan counts the reference again, for each file, on the windows past it; the default bound fits."""
    from npft_gguf.validate import reference

    whole = ("--eval-chunks", "all", "--no-peers")
    ev = by_name(plan_json(configs / "qwen2.5-7b", tmp_path, *GPU24, *whole), "evaluate")
    assert "decoded again for each file" in ev["what"]
    monkeypatch.setattr(reference, "BUDGET_BYTES", 2**50)
    roomy = by_name(plan_json(configs / "qwen2.5-7b", tmp_path, *GPU24, *whole), "evaluate")
    assert "the reference decoded once" in roomy["what"]
    assert ev["tokens"] > roomy["tokens"] and ev["seconds"] > roomy["seconds"]
    monkeypatch.undo()
    bounded = by_name(plan_json(configs / "qwen2.5-7b", tmp_path, *GPU24, "--no-peers"), "evaluate")
    assert "the reference decoded once" in bounded["what"]


@pytest.mark.parametrize("value", ["24XB", "lots", "-3GiB", ""])
def test_bad_sizes_are_one_error_line(configs, tmp_path, value):
    r = run("plan", configs / "llama-2-7b", "-o", tmp_path / "out.gguf", "--gpu-memory", value)
    assert_fails(r, 2, "--gpu-memory", "size")


def test_parse_size():
    assert parse_size("24GiB") == 24 * GiB == parse_size("24G") == parse_size("24 gib")
    assert parse_size("64GB") == 64 * 10**9 and parse_size("512MiB") == 512 * 2**20 and parse_size("1.5T") == int(1.5 * 2**40)
    with pytest.raises(ValueError):
        parse_size("24 GiBs")


# --- convert: refused in its first second, --dry-run, the report's stage table ---------------------
def test_convert_refuses_a_run_that_cannot_fit_before_loading_anything(tiny_bpe, tmp_path, monkeypatch):
    from npft_gguf import sources

    def no_loading(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(sources.HFDirSource, "load_model", no_loading)
    monkeypatch.setattr(stages, "this_machine", lambda *a, **k: Machine(None, 100 * 2**20, 10 * GiB, cores=2))
    r = run("convert", tiny_bpe, "-o", tmp_path / "out.gguf", "--recipe", "short", "--device", "cpu", "--eval-text", "none",
            "--calib-samples", "4", "--calib-len", "32", "--ctx", "64")
    line = assert_fails(r, 2, "cannot fit", "stage", "host memory")
    assert not (tmp_path / "out.gguf").exists() and not (tmp_path / "out.npft-run").exists(), line


def test_convert_dry_run_prints_the_plan_and_writes_nothing(tiny_bpe, tmp_path):
    r = run("convert", tiny_bpe, "-o", tmp_path / "out.gguf", "--recipe", "short", "--device", "cpu",
            "--eval-text", "none", "--ctx", "64", "--dry-run", "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["fits"] is True and [s["name"] for s in d["stages"]][:3] == ["imatrix", "source", "calibration"]
    assert list(tmp_path.iterdir()) == []


def test_the_run_report_puts_measured_beside_planned(tiny_bpe, tmp_path):
    r = run("convert", tiny_bpe, "-o", tmp_path / "out.gguf", "--method", "rtn", "--eval-text", "none", "--json")
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)["stages"]
    assert [row["step"] for row in rows] == ["write"]
    assert rows[0]["measured"]["seconds"] > 0 and rows[0]["measured"]["peak_host_bytes"] > 0
    assert rows[0]["planned"]["peak_host_bytes"] > 0
    assert "Stages: planned and measured" in (tmp_path / "out.npft-run" / "report.md").read_text()


def test_each_step_measures_its_own_host_peak():
    """The process's high-water mark (getrusage) never falls, so every step after the largest showed
    its peak; each step now samples its own."""
    import mmap
    import time

    from npft_gguf.stages import measure

    with measure("cpu") as big:  # 300 MiB of fresh pages, touched, then handed back to the system (a numpy
        x = mmap.mmap(-1, 300 * 2**20)  # array could reuse memory earlier tests freed but the heap kept)
        x.write(b"\1" * len(x))
        time.sleep(4 * measure.SAMPLE_S)
        x.close()
    with measure("cpu") as small:
        time.sleep(4 * measure.SAMPLE_S)
    assert big["peak_host_bytes"] - small["peak_host_bytes"] > 250 * 2**20
    assert small["peak_host_bytes_process"] - small["peak_host_bytes"] > 250 * 2**20  # the old figure: still high
    assert small["seconds"] >= 4 * measure.SAMPLE_S and "peak_device_bytes" not in small


# --- the formulas' terms against the tensors the code makes, on a tiny model ------------------------
def tiny_model_and_dims(folder):
    from npft_gguf.npft import NPFTSettings
    from npft_gguf.sources import open_source

    source = open_source(str(folder))
    npft = NPFTSettings(noise="rtn").for_family(source.arch)
    return source, source.load_model(dtype=torch.float32), Dims.of(source, npft), npft


def test_fisher_and_noise_terms_are_the_bytes_the_code_allocates(tiny_bpe):
    """sensitivity_stage counts 4 P_t / k bytes for the Fisher scores of k passes, noise_bytes the
    weight-dtype rtn error of every layer (of one layer with checkpointing): the tensors
    fisher_diagonal, find_outliers' runs and Perturbation.rtn_error make, to the byte (the runs are
    cut at module boundaries: at most one matrix more than P_t / k)."""
    from dataclasses import replace

    from npft_gguf.npft.noise import Perturbations
    from npft_gguf.sensitivity import _runs, fisher_diagonal, outliers, target_linears

    source, model, d, npft = tiny_model_and_dims(tiny_bpe)
    linears = target_linears(model)
    assert sum(m.weight.numel() for m in linears.values()) == d.linear and len(linears) == d.linears
    assert max(m.weight.numel() for m in linears.values()) == d.largest_linear
    tokens = torch.randint(0, 100, (1, 8))
    fisher = fisher_diagonal(model, tokens, linears, progress=False)
    assert sum(f.numel() * f.element_size() for f in fisher.values()) == 4 * d.linear
    for k in (2, 3, 5):
        held = max(4 * sum(m.weight.numel() for m in run.values()) for run in _runs(linears, k))
        assert 4 * d.linear // k <= held <= 4 * (d.linear // k + d.largest_linear), k
    noise = Perturbations(linears, outliers(fisher, 1.0), "rtn", "outliers", "q8_0", npft.perturbed)
    errors = [p.rtn_error() for p in noise.layers.values()]
    assert None not in errors
    assert sum(z.numel() * z.element_size() for z in errors) == stages.noise_bytes(d, 4, npft)
    per_layer = sum(z.numel() * z.element_size() for z in errors) // d.layers
    assert stages.noise_bytes(d, 4, replace(npft, gradient_checkpointing=True)) == per_layer
    assert d.params == sum(math.prod(s) for s in source.shapes().values())


def test_lora_count_is_peft_s(tiny_bpe):
    from peft import LoraConfig, get_peft_model

    _, model, d, npft = tiny_model_and_dims(tiny_bpe)
    peft_model = get_peft_model(model, LoraConfig(r=npft.rank, target_modules=list(npft.targets)))
    assert sum(p.numel() for p in peft_model.parameters() if p.requires_grad) == d.lora


def test_plan_of_a_gguf_source(tiny_bpe, tmp_path):
    """A GGUF file plans like the Hugging Face folder it was written from: the same shapes."""
    gguf = tmp_path / "tiny.gguf"
    assert run("export", tiny_bpe, "-o", gguf, "--type", "f32").returncode == 0
    a = plan_json(gguf, tmp_path, "--device", "cpu", "--recipe", "short", "--ctx", "64")
    b = plan_json(tiny_bpe, tmp_path, "--device", "cpu", "--recipe", "short", "--ctx", "64")
    assert [s["name"] for s in a["stages"]] == [s["name"] for s in b["stages"]] == DEFAULT_STAGES
    merge = lambda d: next(s for s in d["stages"] if s["name"] == "merge")  # noqa: E731
    assert merge(a)["peak_host_bytes"] == merge(b)["peak_host_bytes"]


# peaks measured by evals/memory_stages.py on SmolLM2-135M, CPU, 256-token samples (evals/README.md,
# "Memory by NPFT stage", gathered probes; re-measured on this tree within 4 %): GiB of process RSS
SMOLLM2_MEASURED = {"source": 1.26, "sensitivity": 2.85, "trace": 4.95, "tune (no noise)": 3.92, "tune (rtn)": 4.4}


def test_formulas_reproduce_the_measured_smollm2_stage_peaks(smollm2):
    """Each host-memory formula within 25 % of the stage's measured peak (same shapes and settings as
    the script: fp32 on CPU, Fisher on 4 samples, the trace with the Fisher scores freed, batch 4 with
    the clean term, ce)."""
    from dataclasses import replace

    from npft_gguf.npft import NPFTSettings

    source = smollm2
    npft = NPFTSettings(noise="rtn", objective="ce", batch=4, clean_weight=0.5).for_family(source.arch)
    d = Dims.of(source, npft)
    estimate = {
        "source": stages.source_stage(d, 4, "cpu", 0),
        "sensitivity": stages.sensitivity_stage(d, 4, "cpu", 4, 256, 1),
        "trace": stages.trace_stage(d, 4, "cpu", 1, 256, 2),
        "tune (no noise)": stages.tune_stage(d, 4, "cpu", replace(npft, noise="none"), 8, 256),
        "tune (rtn)": stages.tune_stage(d, 4, "cpu", npft, 8, 256),
    }
    for name, measured in SMOLLM2_MEASURED.items():
        if name != "trace":
            assert estimate[name].host_bytes / GiB == pytest.approx(measured, rel=0.25), name


@pytest.mark.xfail(strict=True, reason="docs/METHOD.md's trace formula (tensors counted by tests/npft/memory.py) gives "
                   "3.0 GiB for SmolLM2 on the CPU; evals/memory_stages.py still measures 4.7-4.9 GiB of RSS on this tree")
def test_the_trace_formula_reproduces_the_measured_smollm2_peak(smollm2):
    from npft_gguf.npft import NPFTSettings

    d = Dims.of(smollm2, NPFTSettings().for_family(smollm2.arch))
    assert stages.trace_stage(d, 4, "cpu", 1, 256, 2).host_bytes / GiB == pytest.approx(SMOLLM2_MEASURED["trace"], rel=0.25)


def test_the_guard_measures_within_the_model_s_context(tiny_bpe, tmp_path):
    """--eval-text none leaves --ctx (512) unchecked against the model's 256 positions: the guard
    measures 256-token windows instead of failing after the tuning and the writing."""
    from npft_gguf.calib import CalibSettings
    from npft_gguf.convert import ConvertSettings, plan_convert
    from npft_gguf.npft import NPFTSettings

    plan = plan_convert(str(tiny_bpe), tmp_path / "out.gguf", ConvertSettings(eval_text="none"),
                        CalibSettings(calib="wiki", samples=4, length=32), NPFTSettings(noise="rtn"))
    assert plan.guard is not None and plan.guard[2] == 256 and "guard" in plan.steps


def test_within_the_estimates_uncertainty_convert_warns_and_runs(tiny_bpe, tmp_path, monkeypatch):
    """A stage a little over what is free (under stages.MARGIN) may still fit: a warning, not a refusal."""
    from npft_gguf.convert import ConvertSettings, check_fits, plan_convert
    from npft_gguf.calib import CalibSettings
    from npft_gguf.npft import NPFTSettings

    plan = plan_convert(str(tiny_bpe), tmp_path / "x.gguf", ConvertSettings(method="rtn", eval_text="none"),
                        CalibSettings(), NPFTSettings())
    need = stages.plan_stages(plan, Machine(None, 64 * GiB, None))[0].host_bytes
    said = []
    check_fits(plan, Machine(None, int(need / 1.05), None), log=said.append)  # 5 % short
    assert len(said) == 1 and said[0].startswith("warning: may not fit: stage write")
    with pytest.raises(UsageError, match="cannot fit: stage write"):
        check_fits(plan, Machine(None, int(need / 1.3), None))  # 30 % short


def test_the_plan_knows_the_process_count_and_a_70b_model_on_8_gpus(tmp_path):
    """8 processes, one 80 GB GPU each, --no-shard: the tuning runs under DDP (npft/train.py), so each
    GPU holds the whole bf16 model, 70B's 131 GiB: the torch stages do not fit, whatever the process count,
    and the verdict says so; what the processes do change is the time of the stages whose samples
    they share out, and the host memory of the stages every process runs."""
    llama_70b_config().save_pretrained(tmp_path / "llama-3.1-70b")
    machine = ("--gpu-memory", "80GiB", "--host-memory", "2TiB", "--disk", "2TiB", "--cpu-cores", "64")
    one = plan_json(tmp_path / "llama-3.1-70b", tmp_path, *machine)
    eight = plan_json(tmp_path / "llama-3.1-70b", tmp_path, *machine, "--processes", "8", "--no-shard")
    assert eight["machine"]["processes"] == 8 and one["machine"]["processes"] == 1
    by1, by8 = ({s["name"]: s for s in d["stages"]} for d in (one, eight))
    assert by1.keys() == by8.keys()
    for name in ("imatrix", "sensitivity", "tune"):  # samples shared out
        assert by8[name]["seconds"] == pytest.approx(by1[name]["seconds"] / 8)
    for name in ("trace", "merge", "write", "guard", "evaluate"):
        if name in by1:
            assert by8[name]["seconds"] == pytest.approx(by1[name]["seconds"])
    assert by8["source"]["peak_host_bytes"] == 8 * by1["source"]["peak_host_bytes"]  # every process loads the model
    assert by8["write"]["peak_host_bytes"] == by1["write"]["peak_host_bytes"]          # rank 0 alone writes
    for name in ("source", "tune", "merge"):  # per GPU: the whole model in bf16
        assert by8[name]["peak_device_bytes"] >= 2 * 70.5e9
        assert by8[name]["peak_device_bytes"] >= by1[name]["peak_device_bytes"]
    assert not eight["fits"] and eight["refused"]
    assert any(p.startswith("stage tune ") and "80.0 GiB is free" in p for p in eight["problems"])


def test_a_launched_run_plans_for_its_process_count(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert stages.this_machine("cpu", tmp_path).processes == 4
    monkeypatch.delenv("WORLD_SIZE")
    assert stages.this_machine("cpu", tmp_path).processes == 1


def test_a_70b_model_sharded_on_8_gpus_fits(tmp_path):
    """--shard (FSDP2, npft/train.py, imatrix.calibration_imatrix): each GPU holds 1/N of the bf16
    weights and two layers whole in the imatrix, the Fisher scores and the tuning; the source loads
    on rank 0's host alone (one model, not N: distributed.load) and the merge runs on rank 0's CPU;
    the trace is not measured. The plan fits the
    tuning from those per-GPU figures (stages.fit_to_gpu): the default convert (npft+imatrix) of
    Llama-3.1-70B on 8 x 80 GB, and on 4 x 80 GB, fits with the --fisher-stages it picks itself (the
    float32 scores are whole on each process); unsharded (DDP, --no-shard) it does not, and without
    either flag the plan switches --shard on itself, the weights being more than one GPU holds. The evaluation runs in
    llama.cpp on the CPU here (--eval-gpu-layers 0): offloaded whole, it needs the model on one GPU."""
    llama_70b_config().save_pretrained(tmp_path / "llama-3.1-70b")
    machine = ("--gpu-memory", "80GiB", "--host-memory", "2TiB", "--disk", "2TiB", "--cpu-cores", "64",
               "--eval-gpu-layers", "0")
    ddp = plan_json(tmp_path / "llama-3.1-70b", tmp_path, *machine, "--processes", "8", "--no-shard")
    assert not ddp["fits"] and "shard" not in ddp["fitted_by_plan"]
    assert {s["name"]: s for s in ddp["stages"]}["tune"]["peak_device_bytes"] > 2 * 70.5e9
    stages_chosen = {}
    for n in (8, 4):
        sharded = plan_json(tmp_path / "llama-3.1-70b", tmp_path, *machine, "--processes", str(n), "--shard")
        by = {s["name"]: s for s in sharded["stages"]}
        assert sharded["fits"] and sharded["method"] == "auto" and "imatrix" in sharded["steps"]
        assert "trace" not in by and by["source"]["peak_device_bytes"] == 0 and by["merge"]["peak_device_bytes"] == 0
        for name in ("imatrix", "tune"):  # 1/n of the weights, not the whole 131 GiB
            assert 2 * 70.5e9 / n < by[name]["peak_device_bytes"] < 80 * 2**30
        for name in ("imatrix", "source", "merge"):  # rank 0 alone holds the whole model on the host, the others none
            assert 2 * 70.5e9 < by[name]["peak_host_bytes"] < 2 * 70.5e9 + n * 2**30
        assert by["sensitivity"]["peak_device_bytes"] <= 80 * 2**30
        fitted = sharded["fitted_by_plan"]
        assert fitted["gradient_checkpointing"] is True and "trace_samples" not in fitted  # no trace to fit under --shard
        stages_chosen[n] = fitted["fisher_stages"]
    assert 1 < stages_chosen[8] < stages_chosen[4]  # fewer processes, more of each GPU for the weights: more passes
    one_pass = plan_json(tmp_path / "llama-3.1-70b", tmp_path, *machine, "--processes", "8", "--shard", "--fisher-stages", "1")
    assert not one_pass["fits"]  # what the plan picked was needed
    chosen = plan_json(tmp_path / "llama-3.1-70b", tmp_path, *machine, "--processes", "8")
    assert chosen["fits"] and chosen["fitted_by_plan"]["shard"] is True
    assert chosen["fitted_by_plan"]["fisher_stages"] == stages_chosen[8]
    small = plan_json(tmp_path / "llama-3.1-70b", tmp_path, *machine)  # one process: nothing to shard over
    assert "shard" not in small["fitted_by_plan"]
