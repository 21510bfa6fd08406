"""Two processes give what one gives: the tuning, the Fisher sums and outliers, the importance matrix.

Two CPU processes with the gloo backend (torch.multiprocessing spawn, the launcher's environment
set by hand), on tiny random models of two families (llama with the CE objective and the paper's
noise, qwen2 with CE+KL, rtn noise and gradient checkpointing, as the plan switches on for large
models). The tuning runs under DDP, every weight whole on each process; the sharded runs (FSDP2,
--shard) are at the end of this file. LoRA dropout is 0 (each process draws its own dropout
masks), so the global batch and the seed fix every step: the merged weights of a
two-process run stopped in its second epoch and resumed by two processes must agree with an
uninterrupted one-process run's within float rounding (the gradient is summed in another order).
A resume by another process count: test_sigterm_to_one_process_stops_all_and_the_run_resumes.
"""

from __future__ import annotations

import os
import socket

import pytest
import torch

from npft_gguf import distributed
from npft_gguf.npft import NPFTSettings, tune

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="this torch has no gloo backend")

FAMILIES = {
    "llama": dict(objective="ce", noise="paper"),
    "qwen2": dict(objective="ce+kl", noise="rtn", gradient_checkpointing=True),
}
BASE = dict(epochs=2, lr=2e-3, batch=4, grad_accum=1, outlier_pct=1.0, trace_samples=1, trace_probes=1, rank=4, alpha=8,
            dropout=0.0, seed=3)


def _settings(family: str) -> NPFTSettings:
    return NPFTSettings(**BASE, **FAMILIES[family])


def _tokens(vocab: int) -> torch.Tensor:
    """11 samples: the last global batch of an epoch (3 of 4) splits 2 + 1, so the processes' losses
    are weighted unequally there."""
    return torch.randint(0, vocab, (11, 24), generator=torch.Generator().manual_seed(7))


def _load(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path).float()


def _statistics(path, tokens):
    """Fisher sums of the untuned model's linears and its importance matrix over `tokens`."""
    from npft_gguf.imatrix import collect
    from npft_gguf.sensitivity import fisher_diagonal, target_linears

    model = _load(path)
    fisher = fisher_diagonal(model, tokens, target_linears(model), progress=False)
    im = collect(model, _arch(path), tokens, ["test"], batch=2, progress=False)
    return fisher, {n: (torch.from_numpy(e.sums), torch.from_numpy(e.counts)) for n, e in im.entries.items()}


def _arch(path):
    from npft_gguf.sources import open_source

    return open_source(str(path)).arch


def _merged(path, tokens, settings, run_dir, **kw):
    r = tune(_load(path), tokens, settings, run_dir, progress=False, **kw)
    return {k: v.detach().clone() for k, v in r.model.state_dict().items()}, r


def _stop_in_second_epoch(row):
    if row["epoch"] == 2:
        raise KeyboardInterrupt


def _worker(rank: int, world: int, port: int, jobs: list, out: str):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    distributed.setup()
    assert distributed.active() and distributed.world() == world and distributed.rank() == rank
    for family, path in jobs:
        tokens = _tokens(_load(path).config.vocab_size)
        settings = _settings(family)
        try:  # stopped in the second epoch, then resumed: the uninterrupted run's weights are asked of this
            tune(_load(path), tokens, settings, f"{out}/{family}", progress=False, on_step=_stop_in_second_epoch)
        except KeyboardInterrupt:
            pass
        merged, r = _merged(path, tokens, settings, f"{out}/{family}", resume=True)
        assert r.resumed_at_epoch == 1
        fisher, im = _statistics(path, tokens)
        if distributed.is_main():
            torch.save({"merged": merged, "history": r.history, "trace": r.trace_before, "fisher": fisher, "imatrix": im},
                       f"{out}/{family}.pt")
    distributed.teardown()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def qwen2_dir(tmp_path_factory):
    """A tiny qwen2 (tied embeddings, q/k/v biases)."""
    from tests.arch.conftest import make_tiny

    return make_tiny("qwen2", tmp_path_factory.mktemp("dist-qwen2"))


@pytest.fixture(scope="module")
def two_processes(tiny_bpe, qwen2_dir, tmp_path_factory):
    """{family: (model folder, what the two processes saved)}: one spawn of two processes for both families."""
    import torch.multiprocessing as mp

    dirs = {"llama": tiny_bpe, "qwen2": qwen2_dir}
    out = tmp_path_factory.mktemp("two-processes")
    mp.spawn(_worker, args=(2, _free_port(), [(f, str(dirs[f])) for f in FAMILIES], str(out)), nprocs=2, join=True)
    assert not distributed.active()  # this process was never part of the group
    return {f: (dirs[f], torch.load(out / f"{f}.pt")) for f in FAMILIES}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_two_processes_tune_and_score_as_one(two_processes, family, tmp_path):
    from npft_gguf.sensitivity import outliers

    path, two = two_processes[family]

    tokens = _tokens(_load(path).config.vocab_size)
    settings = _settings(family)
    merged, r = _merged(path, tokens, settings, tmp_path / "one")
    assert merged.keys() == two["merged"].keys()
    changed = [k for k in merged if not torch.equal(merged[k], _load(path).state_dict()[k])]
    assert changed  # the tuning moved weights, so agreeing says something
    for k in merged:
        torch.testing.assert_close(two["merged"][k], merged[k], rtol=1e-4, atol=1e-6, msg=k)
    assert [round(h["loss_noisy"], 4) for h in two["history"]] == [round(h["loss_noisy"], 4) for h in r.history]
    assert two["trace"]["estimates"] == pytest.approx(r.trace_before["estimates"], rel=1e-4)

    fisher, im = _statistics(path, tokens)
    for k in fisher:
        torch.testing.assert_close(two["fisher"][k], fisher[k], rtol=1e-4, atol=1e-12, msg=k)
    for name, o in outliers(fisher, settings.outlier_pct).items():
        o2 = outliers(two["fisher"], settings.outlier_pct)[name]
        assert set(zip(o.rows.tolist(), o.cols.tolist())) == set(zip(o2.rows.tolist(), o2.cols.tolist())), name
    assert im.keys() == two["imatrix"].keys()
    for name, (sums, counts) in im.items():
        assert (two["imatrix"][name][1] == counts).all() and counts[0] == tokens.numel()
        torch.testing.assert_close(two["imatrix"][name][0], sums, rtol=1e-5, atol=0, msg=name)



def test_share_splits_every_item_once():
    for n in range(0, 9):
        for parts in (1, 2, 3):
            got = [i for p in range(parts) for i in range(n)[distributed.share(n, p, parts)]]
            assert got == list(range(n))


def test_processes_that_share_a_gpu_take_gloo():
    """nccl where each process has its own GPU; two processes on one GPU (the GPU check): gloo, both on GPU 0."""
    assert distributed.placement(0, 1, 2) == ("gloo", 0)
    assert [distributed.placement(8, r, 8) for r in (0, 7)] == [("nccl", 0), ("nccl", 7)]
    assert [distributed.placement(1, r, 2) for r in (0, 1)] == [("gloo", 0), ("gloo", 0)]


def test_one_process_without_a_launcher_opens_no_group(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert distributed.setup() is None and not distributed.active()
    assert (distributed.rank(), distributed.world(), distributed.is_main()) == (0, 1, True)
    t = torch.ones(3)
    assert distributed.all_reduce_sum([t])[0] is t and t.tolist() == [1, 1, 1]


def _torchrun(*args, cwd, timeout=300):
    """`torchrun --nproc-per-node 2 -m npft_gguf ARGS` on this checkout, as a user would start it."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(_free_port()),
           "-m", "npft_gguf", *map(str, args)]
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_torchrun_imatrix_is_written_once_and_sums_as_one(tiny_bpe, tmp_path):
    from npft_gguf.imatrix import read_imatrix
    from tests.conftest import calib_text
    from tests.test_cli import run

    (tmp_path / "calib.txt").write_text(calib_text(20_000))
    args = [tiny_bpe, "--calib", tmp_path / "calib.txt", "--ctx", "64", "--chunks", "6", "--device", "cpu"]
    p = _torchrun("imatrix", *args, "-o", tmp_path / "two.gguf", cwd=tmp_path)
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err
    assert out.count("wrote ") == 1  # rank 0 alone prints
    one = run("imatrix", *args, "-o", tmp_path / "one.gguf")
    assert one.returncode == 0, one.stderr
    a, b = read_imatrix(tmp_path / "one.gguf"), read_imatrix(tmp_path / "two.gguf")
    assert a.entries.keys() == b.entries.keys() and a.chunk_count == b.chunk_count == 6
    for name, e in a.entries.items():
        assert (b.entries[name].counts == e.counts).all()
        torch.testing.assert_close(torch.from_numpy(b.entries[name].sums), torch.from_numpy(e.sums), rtol=1e-5, atol=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib.txt", "one.gguf", "two.gguf"]  # no temporaries left


def _sigterm_one_rank_after_a_checkpoint(p, out) -> int:
    """Wait for the first checkpoint of the `torchrun ... finetune -o OUT` process `p`, send SIGTERM
    to its second rank and check that both stop, that rank 0 says so once, and that the checkpoint
    is kept with no model and no temporary written; returns the epochs the checkpoint holds."""
    import signal
    import time

    import psutil

    from npft_gguf.npft.train import CHECKPOINT, checkpoint_record

    ckpt = out / "npft-run" / CHECKPOINT
    deadline = time.time() + 180
    while not ckpt.exists() and p.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert ckpt.exists(), p.communicate()[1]
    workers = psutil.Process(p.pid).children()
    assert len(workers) == 2
    workers[1].send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=120)
    assert p.returncode != 0
    assert not any(w.is_running() and w.status() != psutil.STATUS_ZOMBIE for w in workers)
    assert "error: another of the 2 processes of this run stopped" in err and "--resume" in err
    assert not (out / "model.safetensors").exists()
    assert not [f for f in out.rglob("*") if ".part" in f.name or f.name.endswith(".lock")]
    done = checkpoint_record(ckpt.parent)["epoch_done"]
    assert 1 <= done < 3
    return done


def test_sigterm_to_one_process_stops_all_and_the_run_resumes(tiny_bpe, tmp_path):
    from tests.conftest import calib_text
    from tests.test_cli import run

    (tmp_path / "calib.txt").write_text(calib_text(20_000))
    args = [tiny_bpe, "-o", tmp_path / "out", "--recipe", "short", "--calib", tmp_path / "calib.txt", "--calib-samples", "6",
            "--calib-len", "32", "--fisher-samples", "2", "--trace-samples", "0", "--outlier-pct", "1", "--dropout", "0",
            "--batch", "2", "--epochs", "3", "--device", "cpu"]
    done = _sigterm_one_rank_after_a_checkpoint(_torchrun("finetune", *args, cwd=tmp_path), tmp_path / "out")
    r = run("finetune", *args, "--resume")  # one process takes it up
    assert r.returncode == 0, r.stderr
    assert f"resuming {tmp_path / 'out' / 'npft-run'} after epoch {done} of 3" in r.stderr


def test_a_command_that_runs_in_one_process_refuses_a_launcher(tmp_path):
    p = _torchrun("archs", cwd=tmp_path)
    out, err = p.communicate(timeout=300)
    assert p.returncode != 0 and not out
    assert "error: archs runs in one process: start it without torchrun" in err
    assert err.count("error: archs") == 1  # rank 0's line alone


def test_a_process_left_without_samples_still_syncs_at_weight_zero(monkeypatch):
    """A global batch smaller than the process count: the process without a share runs one sample
    at weight 0 (its gradient adds nothing, but it takes part in DDP's all-reduce); the others'
    weights make DDP's average the batch's mean."""
    from npft_gguf.npft.train import _my_part

    idx = torch.tensor([5, 9, 2])
    monkeypatch.setattr(distributed, "world", lambda: 2)
    parts = {}
    for r in (0, 1):
        monkeypatch.setattr(distributed, "rank", lambda r=r: r)
        parts[r] = _my_part(idx)
    assert parts[0][0].tolist() == [5, 9] and parts[1][0].tolist() == [2]
    assert parts[0][1] == pytest.approx(2 * 2 / 3) and parts[1][1] == pytest.approx(2 * 1 / 3)  # sum of weights / 2 = 1
    monkeypatch.setattr(distributed, "rank", lambda: 1)
    mine, weight = _my_part(torch.tensor([4]))
    assert mine.tolist() == [4] and weight == 0.0
    monkeypatch.setattr(distributed, "rank", lambda: 0)
    assert _my_part(torch.tensor([4]))[1] == 2.0


def test_a_convert_without_tuning_refuses_several_processes(tiny_bpe, tmp_path, monkeypatch):
    """--method rtn (or gptq) has no step the processes share: each would write the same file."""
    from npft_gguf.calib import CalibSettings
    from npft_gguf.convert import ConvertSettings, convert
    from npft_gguf.errors import UsageError

    monkeypatch.setattr(distributed, "active", lambda: True)
    with pytest.raises(UsageError, match="--method rtn does no tuning.*without torchrun"):
        convert(str(tiny_bpe), tmp_path / "o.gguf", ConvertSettings(method="rtn", type="q4_0", eval_text="none"),
                CalibSettings(), None, device="cpu")
    assert not list(tmp_path.iterdir())


# sharded runs (FSDP2), each against one unsharded process: the rtn noise (formed in the forward) stopped and
# resumed; the paper noise on the tied qwen2 (its shared embedding gathered once) and the grid noise, both read
# from weights gathered once per epoch (sensitivity.whole), under gradient checkpointing
SHARDED = {
    "llama-rtn": ("llama", dict(objective="ce+kl", noise="rtn", trace_samples=0)),
    "qwen2-paper": ("qwen2", dict(objective="ce", noise="paper", trace_samples=0, gradient_checkpointing=True, epochs=1)),
    "llama-grid": ("llama", dict(objective="ce", noise="grid", trace_samples=0, gradient_checkpointing=True, epochs=1)),
}


def _sharded_settings(job: str, shard: bool = True) -> NPFTSettings:
    return NPFTSettings(**{**BASE, **SHARDED[job][1], "shard": shard})


def _loaded_once(path):
    """The model as a sharded run loads it (distributed.load): whole on rank 0; on rank 1 on the meta
    device, its source's weights never read (its load_model fails there)."""
    from npft_gguf.sources import open_source

    source = open_source(path)
    if not distributed.is_main():
        source.load_model = _no_weights_here
    model = distributed.load(source, torch.float32, "cpu", shard=True)
    assert all(p.is_meta for p in model.parameters()) == (not distributed.is_main())
    return model


def _no_weights_here(*a, **k):
    raise AssertionError("a process other than rank 0 read the weights")


def _sharded_worker(rank: int, world: int, port: int, paths: dict, out: str):
    from npft_gguf.calib import CalibSettings, load_calibration
    from npft_gguf.imatrix import collect
    from npft_gguf.sources import open_source

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    distributed.setup()
    for job, (family, _) in SHARDED.items():
        path = paths[family]
        tokens = _tokens(_load(path).config.vocab_size)
        settings = _sharded_settings(job)
        model = _loaded_once(path)
        if job == "llama-rtn":  # --calib self: rank 0 samples (rank 1's model is on the meta device), both get its tokens
            sampled = distributed.from_main(load_calibration, CalibSettings(calib="self", samples=2, length=8, seed=0),
                                            open_source(path).tokenizer(), model=model, progress=False)
            both = distributed.all_reduce_sum([sampled.clone()])[0]
            assert sampled.shape == (2, 8) and torch.equal(both, 2 * sampled)
        numel = model.model.layers[0].self_attn.q_proj.weight.numel()

        def sharded_then_stop(row, model=model, numel=numel):  # the weights are DTensors, each process holding half of each
            from torch.distributed.tensor import DTensor

            w = model.model.layers[0].layer.self_attn.q_proj.base_layer.weight
            assert isinstance(w, DTensor) and w.to_local().numel() == numel // 2
            _stop_in_second_epoch(row)

        resumed = settings.epochs > 1
        try:  # stopped in the second epoch, then resumed, sharded both times
            r = tune(model, tokens, settings, f"{out}/{job}", progress=False, on_step=sharded_then_stop)
        except KeyboardInterrupt:
            r = tune(_loaded_once(path), tokens, settings, f"{out}/{job}", resume=True, progress=False)
        assert r.resumed_at_epoch == (1 if resumed else None)
        im = None
        if job == "llama-rtn":  # the importance matrix of the float model, sharded (one window a pass: rank 1 runs one uncounted)
            model = _loaded_once(path)
            distributed.shard(model.get_decoder().layers, model)
            im = collect(model, _arch(path), tokens, ["test"], batch=1, progress=False)
            im = {n: (torch.from_numpy(e.sums), torch.from_numpy(e.counts)) for n, e in im.entries.items()}
        if distributed.is_main():
            merged = {k: v.detach().clone() for k, v in r.model.state_dict().items()}
            torch.save({"merged": merged, "history": r.history, "fisher_summary": r.fisher_summary, "imatrix": im},
                       f"{out}/{job}.pt")
        else:
            assert r.model is None  # rank 0 alone holds the tuned model
    distributed.teardown()


@pytest.fixture(scope="module")
def sharded(tiny_bpe, qwen2_dir, tmp_path_factory):
    """{job: (model folder, its run folder, what rank 0 saved)}: one spawn of two processes for every job."""
    import torch.multiprocessing as mp

    paths, out = {"llama": str(tiny_bpe), "qwen2": str(qwen2_dir)}, tmp_path_factory.mktemp("sharded")
    mp.spawn(_sharded_worker, args=(2, _free_port(), paths, str(out)), nprocs=2, join=True)
    return {job: (paths[f], out / job, torch.load(out / f"{job}.pt")) for job, (f, _) in SHARDED.items()}


@pytest.mark.parametrize("job", list(SHARDED))
def test_two_sharded_processes_tune_as_one(sharded, job, tmp_path):
    """FSDP2 (`fully_shard`, on CPU with gloo): every weight sharded across two processes, the noise
    formed inside the forward (rtn) or from weights gathered once an epoch (paper, grid), the Fisher
    scores from module hooks, the checkpoint and the merge gathered on rank 0: the merged weights,
    the losses and the first epoch's outliers are one unsharded process's, and (llama-rtn) the run
    resumed by two processes from its checkpoint is the uninterrupted one."""
    from safetensors.torch import load_file

    from npft_gguf.npft.train import CHECKPOINT

    path, run_dir, two = sharded[job]
    tokens = _tokens(_load(path).config.vocab_size)
    merged, r = _merged(path, tokens, _sharded_settings(job, shard=False), tmp_path / "one")
    assert merged.keys() == two["merged"].keys()
    assert [k for k in merged if not torch.equal(merged[k], _load(path).state_dict()[k])]
    for k in merged:
        torch.testing.assert_close(two["merged"][k], merged[k], rtol=1e-4, atol=1e-6, msg=k)
    assert [round(h["loss_noisy"], 4) for h in two["history"]] == [round(h["loss_noisy"], 4) for h in r.history]
    for a, b in zip(two["fisher_summary"], r.fisher_summary, strict=True):
        assert a["module"] == b["module"] and a["outliers"] == b["outliers"]
        assert a["score_ratio"] == pytest.approx(b["score_ratio"], rel=1e-4)
    one, sharded_ckpt = load_file(tmp_path / "one" / CHECKPOINT), load_file(run_dir / CHECKPOINT)
    assert one.keys() == sharded_ckpt.keys()
    for k in one:
        if k.startswith("outliers:"):
            assert torch.equal(one[k], sharded_ckpt[k]), k
        else:
            torch.testing.assert_close(sharded_ckpt[k], one[k], rtol=1e-4, atol=1e-6, msg=k)
    if two["imatrix"] is not None:  # the sharded importance matrix: one process's sums and counts
        im = _statistics(path, tokens)[1]
        assert im.keys() == two["imatrix"].keys()
        for name, (sums, counts) in im.items():
            assert (two["imatrix"][name][1] == counts).all() and counts[0] == tokens.numel()
            torch.testing.assert_close(two["imatrix"][name][0], sums, rtol=1e-5, atol=0, msg=name)


def test_torchrun_sharded_finetune_stops_on_sigterm_resumes_and_equals_one_process(tiny_bpe, tmp_path):
    """`torchrun --nproc-per-node 2 -m npft_gguf finetune --shard`, as a user starts it (gloo on CPU):
    a SIGTERM to one rank after the first checkpoint stops both, leaves the checkpoint and no
    temporary; the run resumed by two sharded processes writes the merged model one uninterrupted
    process writes, within float rounding."""
    from safetensors.torch import load_file

    from tests.conftest import calib_text
    from tests.test_cli import run

    (tmp_path / "calib.txt").write_text(calib_text(20_000))
    args = [tiny_bpe, "--recipe", "short", "--calib", tmp_path / "calib.txt", "--calib-samples", "6", "--calib-len", "32",
            "--fisher-samples", "3", "--trace-samples", "0", "--outlier-pct", "1", "--dropout", "0", "--batch", "2",
            "--epochs", "3", "--noise", "rtn", "--resample", "step", "--device", "cpu"]
    out = tmp_path / "two"
    done = _sigterm_one_rank_after_a_checkpoint(_torchrun("finetune", *args, "-o", out, "--shard", cwd=tmp_path), out)

    p = _torchrun("finetune", *args, "-o", out, "--shard", "--resume", cwd=tmp_path)
    _, err = p.communicate(timeout=300)
    assert p.returncode == 0, err
    assert f"resuming {out / 'npft-run'} after epoch {done} of 3" in err
    assert '"shard": true' in (out / "report.json").read_text()
    one = run("finetune", *args, "-o", tmp_path / "one")
    assert one.returncode == 0, one.stderr
    a, b = load_file(tmp_path / "one" / "model.safetensors"), load_file(out / "model.safetensors")
    assert a.keys() == b.keys()
    base = load_file(tiny_bpe / "model.safetensors")
    assert any(not torch.equal(a[k], base[k]) for k in a if k in base)  # the tuning moved weights
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-6, msg=k)
