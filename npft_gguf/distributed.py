"""Several processes, one per device: who this process is, and the few collectives the pipeline needs.

A launcher (`torchrun --nproc-per-node N`, `accelerate launch`) starts N copies of the command and
tells each its place through the environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, ...).
`setup` reads that and has accelerate (PartialState) open the process group: gloo on CPU, nccl on
CUDA (gloo where processes share a GPU: `placement`). Without a launcher nothing is opened and every helper here is the identity of one process,
so a plain run behaves exactly as before.

What the stages share across processes is only ever a sum (Fisher's squared gradients, the
imatrix's squared activations and token counts, a loss for the log): `all_reduce_sum`. Which
samples a process takes is `share`. Gradients of the tuning are averaged by DDP (npft/train.py),
not here. Under --shard the weights are read once, by rank 0 (`load`), and handed out shard by
shard (`shard`); what only rank 0 can then compute reaches the others through `from_main`.
"""

from __future__ import annotations

import contextlib
import os

LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def launched() -> bool:
    """True when a launcher started this process as one of several (WORLD_SIZE > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1) > 1


def setup():
    """Open the process group when launched as one of several processes (once; later calls are
    free); returns accelerate's PartialState, or None for a single process."""
    if not launched():
        return None
    import torch
    from accelerate import PartialState

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    cpu = gpus == 0
    backend, gpu = placement(gpus, int(os.environ.get("LOCAL_RANK", "0")), int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    if not cpu:  # "cuda" means this process's own GPU from here on
        torch.cuda.set_device(gpu)
    state = PartialState(cpu=cpu, **({"backend": backend} if backend == "gloo" else {}))
    if backend == "gloo":  # accelerate leaves a gloo group to the first collective; open it now, with every rank present
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("gloo", rank=state.process_index, world_size=state.num_processes)
    return state


def placement(gpus: int, local_rank: int, local_world: int) -> tuple[str, int]:
    """(backend, GPU index) of a process: nccl on its own GPU; gloo on the CPU; gloo too where the
    processes of a machine outnumber its GPUs and share them (nccl refuses two ranks on one GPU),
    which the GPU check does to run two processes on one GPU."""
    if gpus == 0:
        return "gloo", 0
    return ("nccl" if local_world <= gpus else "gloo"), local_rank % gpus


def active() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if active() else 0


def world() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """Whether this process writes files, prints progress and the report (rank 0, or the only one)."""
    return rank() == 0


def on_main(fn, *args, **kwargs):
    """`fn(...)` on rank 0 alone (a file written), the others waiting until it is done, so that
    whatever reads the file next finds it; returns fn's result on rank 0, None elsewhere."""
    result = fn(*args, **kwargs) if is_main() else None
    barrier()
    return result


def quiet_other_ranks():
    """Ranks other than 0 print nothing: their stdout and stderr go to /dev/null (rank 0 prints the
    progress, the result and any error; a rank that fails alone breaks the collectives, and rank 0
    says so)."""
    import sys

    if not is_main():
        sys.stdout = sys.stderr = open(os.devnull, "w")  # noqa: SIM115 - for the life of the process


def from_main(fn, *args, **kwargs):
    """`fn(...)` on rank 0 alone, its result (any picklable value) sent to every process: what only
    rank 0 can compute, as sampling text from the model (--calib self) where the others hold it on
    the meta device (`load`)."""
    if not active():
        return fn(*args, **kwargs)
    import torch.distributed as dist

    box = [fn(*args, **kwargs) if is_main() else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def share(n: int, part: int | None = None, parts: int | None = None) -> slice:
    """This process's contiguous share of n items: the first n % parts processes take one more."""
    part, parts = rank() if part is None else part, world() if parts is None else parts
    base, extra = divmod(n, parts)
    start = part * base + min(part, extra)
    return slice(start, start + base + (part < extra))


def all_reduce_sum(tensors):
    """Sum each tensor (in place) over the processes; one process: unchanged. Returns them."""
    if not active():
        return tensors
    import torch.distributed as dist

    for t in tensors:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return tensors


def sum_float(x: float) -> float:
    """A Python number summed over the processes (float64)."""
    if not active():
        return x
    import torch

    t = torch.tensor([x], dtype=torch.float64, device=_comm_device())
    all_reduce_sum([t])
    return float(t.item())


def sharding(shard: bool) -> bool:
    """Whether the tuning shards its weights (FSDP2): asked (--shard) and several processes run."""
    return shard and world() > 1


def load(source, dtype, device, shard: bool):
    """The model this process starts from: `source` whole on `device`; under --shard (several
    processes), whole on rank 0's CPU alone, every other process building it on the meta device
    (Source.skeleton: no weight read, no memory), so the host holds one model, not one per process.
    `shard` below then hands each process its share from rank 0."""
    if not sharding(shard):
        return source.load_model(dtype=dtype, device=device)
    return source.load_model(dtype=dtype, device="cpu") if is_main() else source.skeleton(dtype=dtype)


def shard(layers, root, wrap=None):
    """FSDP2 (`fully_shard`) over a model: each of `layers` (a ModuleList of decoder layers, each
    first put in `wrap`'s shell where given) its own unit, `root` the unit of the rest (embeddings,
    norm, head), the weights split across the processes and moved to this process's device; each
    unit is gathered whole only for its forward (and backward). Returns `root`.

    The weights come from rank 0 (FSDP2's recipe for a model loaded once): the others may hold the
    model on the meta device (`load`). Rank 0's whole state is taken before sharding; the others'
    storage is made (`to_empty`) and each process receives its shards of every tensor, broadcast one
    at a time (set_model_state_dict, broadcast_from_rank0), then every buffer whole (rotary
    inv_freq and the like, which no state dict holds and to_empty leaves unset). Rank 0's whole
    copy is dropped when done."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.fsdp import fully_shard

    if wrap is not None:
        for i in range(len(layers)):
            layers[i] = wrap(layers[i])
    whole = root.state_dict() if is_main() else {}
    for layer in layers:
        fully_shard(layer)
    fully_shard(root)
    if not is_main():  # rank 0's shards were cut from its real weights; the others' are made here
        root.to_empty(device=_shard_device())
    set_model_state_dict(root, whole, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    del whole
    _broadcast_buffers(root)
    return root


def _shard_device():
    """Where fully_shard's default mesh puts the shards: this process's GPU, else the CPU."""
    import torch

    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def _broadcast_buffers(module):
    """Every buffer of `module` as rank 0 holds it (in the same order on every process)."""
    import torch.distributed as dist

    if not active():
        return
    for _, b in module.named_buffers():
        dist.broadcast(b.data, src=0)


def barrier():
    if active():
        import torch.distributed as dist

        dist.barrier()


def _comm_device():
    """Where a collective's tensor must live: the local GPU for nccl, else the CPU."""
    import torch
    import torch.distributed as dist

    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def peer_lost(e: BaseException) -> bool:
    """Whether `e` is a collective failing because another process of the run went away (stopped
    by a signal, or failed on its own)."""
    if not active():
        return False
    import torch.distributed as dist

    text = str(e)
    return isinstance(e, getattr(dist, "DistError", ())) or any(
        s in text for s in ("Connection closed by peer", "Connection reset by peer", "NCCL communicator was aborted"))


def teardown():
    """Close the process group at the end of the command (cli.py), whatever ended it; a group a lost
    peer already broke is let go."""
    if active():
        import torch.distributed as dist

        with contextlib.suppress(Exception):
            dist.destroy_process_group()
