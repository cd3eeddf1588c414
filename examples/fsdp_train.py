"""Train the reference GPT with FSDP2 (``fully_shard``) and a quotient optimizer; checkpoint with DCP.

    torchrun --nproc_per_node 2 examples/fsdp_train.py --steps 20 --checkpoint runs/fsdp
    torchrun --nproc_per_node 2 examples/fsdp_train.py --steps 40 --checkpoint runs/fsdp  # resumes

Runs on CPUs with gloo (on GPUs with NCCL, one per process). ``--placement heads`` shards every
head sector on its head axis (FSDP2's default ``Shard(0)``: the quotient step is local),
``--placement rows`` shards the sectors whose rows split evenly along the rows (their ``k x k``
Grams are all-reduced in the step, for either optimizer). With ``--checkpoint DIR`` the run
resumes from ``DIR`` when it holds a checkpoint (on any number of processes) and saves there at
the end. Each rank trains on its own byte-level batches of the Python standard library's
``os.py``, drawn from a generator seeded by the step and the rank, so a resumed run sees the
batches the uninterrupted one would have.
"""

from __future__ import annotations

import argparse
import os
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard

from quotientopt.distributed import fully_shard
from quotientopt.models import GPT, GPTConfig
from quotientopt.optim import QuotientAdam, QuotientSGD, split_parameters


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--optimizer", choices=("sgd", "adam"), default="sgd")
    parser.add_argument("--placement", choices=("heads", "rows"), default="heads")
    parser.add_argument("--steps", type=int, default=20, help="train until this step")
    parser.add_argument("--batch", type=int, default=8, help="sequences per rank and step")
    parser.add_argument("--checkpoint", type=Path, default=None, help="resume from / save to")
    return parser.parse_args(argv)


def rows_where_even(world: int):
    """A ``shard_placement_fn``: the rows (``Shard(-2)``) of head sectors whose row count the
    world size divides, FSDP2's default ``Shard(0)`` for everything else."""

    def placement(p: torch.nn.Parameter) -> Shard | None:
        if getattr(p, "manifold", None) is not None and p.shape[-2] % world == 0:
            return Shard(p.ndim - 2)
        return None

    return placement


def main(argv: list[str] | None = None) -> dict[str, float]:
    args = parse(argv)
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(
        f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if backend == "nccl" else "cpu"
    )
    if device.type == "cuda":
        torch.cuda.set_device(device)
    mesh = init_device_mesh(device.type, (world,))

    torch.manual_seed(0)  # the same initialization on every rank
    config = GPTConfig(n_layer=2, n_head=4, n_embd=64, block_size=64)
    model = GPT(config).to(device)
    placement = rows_where_even(world) if args.placement == "rows" else None
    for block in model.h:  # bottom-up, as with torch's fully_shard
        fully_shard(block, mesh=mesh, shard_placement_fn=placement)
    fully_shard(model, mesh=mesh, shard_placement_fn=placement)

    heads, rest = split_parameters(model.parameters())
    if args.optimizer == "sgd":  # the setting `quotientopt compare` uses
        groups = [{"params": heads, "lr": 0.01}, {"params": rest, "lr": 0.3}]
        optimizer = QuotientSGD(groups, momentum=0.9, nesterov=True)
    else:
        optimizer = QuotientAdam([{"params": heads}, {"params": rest}], lr=3e-3)

    start = 0
    if args.checkpoint is not None and (args.checkpoint / ".metadata").exists():
        model_state, optim_state = get_state_dict(model, optimizer)
        state = {"model": model_state, "optim": optim_state, "progress": {"step": 0}}
        dcp.load(state, checkpoint_id=str(args.checkpoint))
        set_state_dict(
            model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"]
        )
        start = int(state["progress"]["step"])
        if rank == 0:
            print(f"resumed from {args.checkpoint} at step {start} on {world} processes")

    text = torch.frombuffer(bytearray(Path(os.__file__).read_bytes()), dtype=torch.uint8)
    loss = torch.zeros(())
    for step in range(start, args.steps):
        gen = torch.Generator().manual_seed(1000 * step + rank)
        offsets = torch.randint(0, len(text) - config.block_size - 1, (args.batch,), generator=gen)
        idx = torch.stack([text[o : o + config.block_size + 1] for o in offsets]).long()
        idx = idx.to(device)
        _, loss = model(idx[:, :-1], idx[:, 1:])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        loss = loss.detach()
        dist.all_reduce(loss)
        loss /= world
        if rank == 0 and (step % 10 == 0 or step == args.steps - 1):
            print(f"step {step:4d}  loss {float(loss):.4f}")

    if args.checkpoint is not None:
        model_state, optim_state = get_state_dict(model, optimizer)
        state = {"model": model_state, "optim": optim_state, "progress": {"step": args.steps}}
        replacing = (Path(args.checkpoint) / ".metadata").exists()
        with warnings.catch_warnings():
            # torch warns on every rank that it overwrites; we say it once, below
            warnings.filterwarnings("ignore", message="Detected an existing checkpoint")
            dcp.save(state, storage_writer=dcp.FileSystemWriter(args.checkpoint, overwrite=True))
        if rank == 0:
            replaced = " (replaced the checkpoint that was there)" if replacing else ""
            print(f"saved {args.checkpoint} at step {args.steps}{replaced}")
    dist.barrier()
    dist.destroy_process_group()
    return {"loss": float(loss), "start": start}


if __name__ == "__main__":
    main()
