"""
Several processes, one model: data parallelism with torch.distributed's DDP, started by torchrun.

    torchrun --standalone --nproc_per_node 2 sft.py      (2 processes here: gloo on CPU)
    torchrun --standalone --nproc_per_node 8 dpo.py      (8 GPUs: nccl, a GPU per process)

Each process (rank) holds a copy of the model and takes its share of every batch: the global batch
stays the flag's value (--batch-size, --sft-batch-size, ...), cut into W equal shares, and with
--grad-accum K each share is cut again into K micro-batches run one after the other. Each
micro-batch's loss is scaled so that the gradients, summed over the K micro-batches and averaged
over the W ranks by DDP's all-reduce, are the gradient of the whole batch's loss: W processes
train the same model as one, up to the order of floating-point sums. Every rank draws the same
data order (the same seed); rank 0 alone evaluates, logs and writes.

Plain `python sft.py` (no torchrun, no WORLD_SIZE in the environment) never touches
torch.distributed: the code runs exactly as it would without this file.
"""

import os

import torch
import torch.distributed as dist

import plumbing as P


def world_size():
    """How many processes train together: torchrun's WORLD_SIZE, 1 without it."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank():
    return dist.get_rank() if dist.is_initialized() else 0


def is_main():
    """Rank 0: the process that evaluates, logs and writes files."""
    return rank() == 0


def setup(device):
    """Join the other processes when torchrun started several (once per process; nccl on CUDA, a
    GPU per local rank, gloo elsewhere). -> the device this rank trains on"""
    if world_size() == 1:
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def check_split(batch_sizes, grad_accum, splittable=None):
    """The flags of a run on several processes or micro-batches, checked before any work (ConfigError):
    each global batch cuts into world_size x grad_accum equal shares; splittable: None, or why this
    run's loss cannot be split (it is not a mean over the batch's rows)."""
    W = world_size()
    P.require(grad_accum >= 1, f"--grad-accum must be >= 1, got {grad_accum}")
    if W * grad_accum == 1:
        return
    P.require(splittable is None, f"{splittable}: it cannot be split across processes or micro-batches; run it "
              f"in one process with --grad-accum 1")
    for flag, size in batch_sizes.items():
        P.require(size >= W, f"{flag} {size} is smaller than the {W} processes: each needs a share of the batch")
        P.require(size % (W * grad_accum) == 0, f"{flag} {size} does not cut into {W} process(es) x --grad-accum "
                  f"{grad_accum} equal micro-batches: make it a multiple of {W * grad_accum}")


def training_model(model, device, compile=False, ddp=True):
    """The model the training forward runs through: with compile, torch.compile's (it traces the forward
    once per shape family, then runs fused kernels); on several processes, inside DDP's wrapper (its
    backward all-reduces the gradients; ddp=False: a stage whose every rank makes the same update).
    Plainly the model itself. The weights stay the model's own."""
    if compile:
        model = torch.compile(model, dynamic=True)  # dynamic: the batches' lengths vary
    if world_size() == 1 or not ddp:
        return model
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                                     else None)


def micro_batches(model, rows, grad_accum):
    """This rank's share of a global batch (a list, or a tuple of tensors whose first dimension is the
    batch), in grad_accum micro-batches, each with its weight: its share of the global batch, times W
    (DDP divides the all-reduced gradient sum by W). Under DDP the gradients are all-reduced on the
    last micro-batch's backward only (nanoGPT's switch). -> yields (micro-batch, weight)"""
    W, n = world_size(), len(rows[0]) if isinstance(rows, tuple) else len(rows)
    P.require(n % (W * grad_accum) == 0, f"a batch of {n} rows does not cut into {W} process(es) x --grad-accum "
              f"{grad_accum} equal micro-batches")
    size = n // (W * grad_accum)
    for k in range(grad_accum):
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model.require_backward_grad_sync = k == grad_accum - 1
        start = (rank() * grad_accum + k) * size
        part = tuple(r[start: start + size] for r in rows) if isinstance(rows, tuple) else rows[start: start + size]
        yield part, size / n * W


def sum_over_ranks(counts):
    """A dict of numbers summed over the ranks (each rank counts its own work)."""
    if world_size() == 1:
        return counts
    values = torch.tensor([float(v) for v in counts.values()], dtype=torch.float64)
    dist.all_reduce(values)
    return dict(zip(counts, values.tolist()))


def sharded(fn, items):
    """fn over items, the items dealt round-robin to the ranks and the results gathered back in order
    on every rank. fn(items) -> tuple of (len(items),) tensors on the CPU."""
    W = world_size()
    if W == 1:
        return fn(items)
    mine = fn(items[rank()::W])
    longest = (len(items) + W - 1) // W
    out = []
    for t in mine:
        padded = torch.zeros(longest, dtype=t.dtype)
        padded[: len(t)] = t
        gathered = [torch.zeros_like(padded) for _ in range(W)]
        dist.all_gather(gathered, padded)
        whole = torch.zeros(len(items), dtype=t.dtype)
        for r in range(W):
            whole[r::W] = gathered[r][: len(range(r, len(items), W))]
        out.append(whole)
    return tuple(out)


def mean_over_ranks(record):
    """A dict of floats averaged over the ranks (each rank's figures are of equal shares)."""
    return {k: v / world_size() for k, v in sum_over_ranks(record).items()}


def my_share(items):
    """This rank's contiguous share of a list that cuts into world_size equal parts."""
    share = len(items) // world_size()
    return items[rank() * share: (rank() + 1) * share]


def gathered(parts):
    """Every rank's dict of lists and tensors (its share of something, e.g. RL's rollouts), joined
    in rank order on every rank: lists concatenated, tensors along their first dimension."""
    if world_size() == 1:
        return parts
    every = [None] * world_size()
    dist.all_gather_object(every, parts)
    return {k: torch.cat([p[k] for p in every]) if torch.is_tensor(v) else [x for p in every for x in p[k]]
            for k, v in parts.items()}


def finished(metrics):
    """The end of a stage on every rank: they wait for rank 0's evaluation and writing (a later stage
    reads its checkpoint). -> metrics (rank 0's; {} on the others)"""
    if world_size() > 1:
        dist.barrier()
    return metrics


def teardown():
    if dist.is_initialized():
        dist.destroy_process_group()
