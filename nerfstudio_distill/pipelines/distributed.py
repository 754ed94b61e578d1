"""Training on several GPUs (``--machine.num-devices N``): what the ranks share, and how.

nerfstudio trains on N GPUs with N processes (NCCL between GPUs). Its ``VanillaPipeline`` wraps ``_model``
in DistributedDataParallel, but ``pipeline.model`` is the unwrapped module, so a loss computed through it
is never averaged over the ranks: each GPU silently trains its own copy (nerfstudio #1847). Our pipelines
render through ``pipeline.model`` (whole images in chunks, a two-pass backward of many forwards per step,
steps skipped on NaN/Inf on one rank), and DDP's reducer wants exactly one forward and one backward per
step on every rank. So they keep the model unwrapped and do explicitly what DDP would:

- every rank starts from rank 0's parameters and buffers (:func:`broadcast_module`, as DDP does when it
  wraps a module; a run that loads a checkpoint loads the same one everywhere anyway);
- each rank draws its own view(s), crop, t and noise (:func:`step_generator` seeds a step's generator with
  the rank; rank 0's stream is the single-process one), runs its own prior and its own backward;
- one all-reduce then averages the gradients of every trainable parameter before the optimizer step
  (:func:`average_gradients`). A parameter no rank gave a gradient keeps none, as with DDP's
  ``find_unused_parameters``; one that only some ranks did gets the average with zeros for the others.
  A small all-reduce before it tells every rank whether any rank skipped the step (NaN/Inf), so all skip
  it together and stay identical;
- rank 0's viewer inputs are sent to every rank before each step (:func:`broadcast_objects`); nerfstudio
  runs the viewer and writes checkpoints on rank 0 only.

This module imports nothing of the plugin and nothing of nerfstudio.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

RANK_STRIDE = 0x9E3779B9
"""Offset between the seeds of two ranks' step generators. torch's CPU generator keeps only the low 32 bits
of a seed, so ranks are spread over them (2^32 / golden ratio): with up to 64 ranks, two ranks' seeds are
over 34 million apart, so no rank repeats another's stream within a run of fewer steps."""


def initialized() -> bool:
    """Whether this process is one of several in a torch.distributed process group."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's global rank (0 outside a process group)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def step_generator(seed: int, step: int, rank: int = 0) -> torch.Generator:
    """The CPU generator of one step's draws (view, crop, t, noise) on ``rank``: one stream per
    ``(seed, step, rank)``; rank 0's is the stream of a single-process run."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step + rank * RANK_STRIDE) % 2**32)


def comm_device(hint: torch.device | str | None = None) -> torch.device:
    """Where tensors must be for a collective: a CUDA device for NCCL (``hint`` if it is one, else the
    current device), the CPU for gloo."""
    if dist.get_backend() != dist.Backend.NCCL:
        return torch.device("cpu")
    if hint is not None and torch.device(hint).type == "cuda":
        return torch.device(hint)
    return torch.device("cuda", torch.cuda.current_device())


def broadcast_module(module: nn.Module, src: int = 0) -> None:
    """Copy rank ``src``'s parameters and buffers of ``module`` to every rank, in place."""
    if not initialized():
        return
    with torch.no_grad():
        for tensor in itertools.chain(module.parameters(), module.buffers()):
            _broadcast_in_place(tensor.data, src)


def _broadcast_in_place(tensor: torch.Tensor, src: int) -> None:
    """``dist.broadcast`` of ``tensor`` from ``src``, through a copy where the backend needs another device
    or layout (NCCL: CUDA; gloo: CPU; contiguous; bools as bytes)."""
    device = comm_device(tensor.device)
    sent = tensor.to(device).contiguous()
    dist.broadcast(sent.view(torch.uint8) if sent.dtype == torch.bool else sent, src)
    if sent.data_ptr() != tensor.data_ptr():
        tensor.copy_(sent)


def average_gradients(params: Sequence[nn.Parameter], skip: bool = False) -> bool:
    """Average the gradients of ``params`` (the same list, in the same order, on every rank) over the ranks,
    in place; returns whether any rank passed ``skip`` (then no gradient is touched and every rank should
    drop the step).

    A rank without a gradient for a parameter adds zeros; a parameter without a gradient on every rank
    keeps ``grad = None`` (so Adam leaves it alone, as in a single-process run). One all-reduce of a flag
    per parameter and the skip flag, then one all-reduce of the flattened gradients per dtype.
    """
    if not initialized():
        return skip
    world = dist.get_world_size()
    device = comm_device(params[0].device if params else None)
    control = torch.tensor([p.grad is not None for p in params] + [skip], dtype=torch.float32, device=device)
    dist.all_reduce(control)
    if control[-1] > 0:
        return True
    has_grad = (control[:-1] > 0).tolist()
    groups: dict[torch.dtype, list[nn.Parameter]] = {}
    for p, used in zip(params, has_grad, strict=True):
        if used:
            groups.setdefault(p.dtype, []).append(p)
    for group in groups.values():
        flat = torch.cat(
            [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).to(device) for p in group]
        )
        dist.all_reduce(flat)
        flat /= world
        for p, chunk in zip(group, flat.split([p.numel() for p in group]), strict=True):
            chunk = chunk.view_as(p)
            if p.grad is None:
                p.grad = chunk.to(p.device, copy=True)
            else:
                p.grad.copy_(chunk)
    return False


def max_over_ranks(value: int) -> int:
    """The largest of every rank's ``value`` (e.g. a signal number, 0 for none)."""
    if not initialized():
        return value
    tensor = torch.tensor([value], dtype=torch.int64, device=comm_device())
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return int(tensor.item())


def broadcast_objects(values: list[Any], src: int = 0) -> list[Any]:
    """Rank ``src``'s ``values`` (picklable objects), on every rank."""
    if not initialized():
        return values
    values = list(values)
    device = comm_device()
    dist.broadcast_object_list(values, src, device=device if device.type == "cuda" else None)
    return values


def broadcast_tensors(tensors: list[torch.Tensor], owners: list[int]) -> None:
    """Every rank receives ``tensors[i]`` from rank ``owners[i]``, in place (the other ranks pass a tensor
    of the right shape and dtype to receive into)."""
    if not initialized():
        return
    for tensor, owner in zip(tensors, owners, strict=True):
        _broadcast_in_place(tensor, owner)
