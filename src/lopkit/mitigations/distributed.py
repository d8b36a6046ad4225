"""Keep DistributedDataParallel replicas identical when a method decides from per-rank activation statistics.

Under DDP every rank sees its own slice of the global batch, and the gradients are averaged, so the weights stay
equal on every rank. A method that resets units from *activation* statistics (CBP's utility, ReDo's dormancy,
SNR's firing record) would see different statistics on each rank, reset different units and let the replicas
drift apart. These helpers combine such statistics over the ranks of the DDP model's process group, so that
every rank takes the decision that one process would take on the global batch. They do nothing unless the model
given to ``attach`` is a ``DistributedDataParallel`` whose group has more than one rank.

Every rank must call them at the same point of the same step (each method does so in ``after_step``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lopkit.layer_types import wrapper_chain


def ddp_process_group(model: nn.Module) -> Any | None:
    """The process group of the ``DistributedDataParallel`` in ``model``'s wrappers when it has more than one rank;
    None for any other model, so single-process training takes no collective."""
    from torch.nn.parallel import DistributedDataParallel

    for module in wrapper_chain(model):
        if isinstance(module, DistributedDataParallel):
            import torch.distributed as dist

            return module.process_group if dist.get_world_size(module.process_group) > 1 else None
    return None


def sum_over_ranks(state: dict[str, Any], group: Any | None) -> dict[str, Any]:
    """A copy of ``state`` whose tensors and numbers are summed over the ranks of ``group`` (itself when None).

    For statistics that add up over samples (sums, counts, Gram matrices): the result is the statistic of the
    global batch. Other values are kept as they are.
    """
    if group is None:
        return state
    result = dict(state)
    for key, value in state.items():
        if isinstance(value, torch.Tensor):
            result[key] = _summed(value, group)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            total = _summed(torch.tensor(float(value), dtype=torch.float64, device=_group_device(group)), group)
            result[key] = type(value)(total.item())
    return result


def mean_over_ranks(tensor: torch.Tensor, group: Any | None) -> torch.Tensor:
    """The mean of ``tensor`` over the ranks of ``group`` (a new tensor; ``tensor`` itself when None).

    For per-batch means taken on equal-sized per-rank batches: the result is the global batch's mean.
    """
    if group is None:
        return tensor
    import torch.distributed as dist

    return _summed(tensor, group) / dist.get_world_size(group)


def gather_over_ranks(tensor: torch.Tensor, group: Any | None) -> torch.Tensor:
    """``tensor`` of every rank of ``group`` stacked in rank order (shape ``(ranks, *tensor.shape)``)."""
    if group is None:
        return tensor.unsqueeze(0)
    import torch.distributed as dist

    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, tensor.contiguous(), group=group)
    return torch.stack(parts)


def _summed(tensor: torch.Tensor, group: Any) -> torch.Tensor:
    """A copy of ``tensor`` summed over the ranks of ``group`` (one all-reduce)."""
    import torch.distributed as dist

    total = tensor.clone()
    dist.all_reduce(total, group=group)
    return total


def _group_device(group: Any) -> torch.device:
    """The device a collective of ``group`` needs its tensors on: CUDA for NCCL, else the CPU."""
    import torch.distributed as dist

    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
