"""What a model needs to build the same memory under DDP as in one process.

Two kinds of training-set state, two remedies:

* **Built from the whole training set with a frozen network** (PMAD's prototype pool, MaskAD's
  coreset, its feature standardisation and M_po calibration): every rank reads the *whole*
  training set itself, in dataset order, through :func:`full_training_loader`. With a frozen
  backbone this is exact: every rank, and a single-process run, computes the same features in
  the same order, so coresets (k-center greedy depends on the order), quantiles and statistics
  are identical, with no padding duplicates from the distributed sampler and no gather of
  large feature tensors. The cost is that every rank repeats the pass (``world_size`` x a
  forward of the frozen backbone over the training set, once per fit).
* **Accumulated from the training batches during training** (PMAD's per-category patch-error
  recorder and its likelihood reference): each rank sees only its shard of every global batch,
  so the per-rank values are gathered (:func:`gather_rows`) or reduced (:func:`reduce_min`)
  across ranks at every step, which makes them what one process sees for the global batch.
* **Batch statistics inside a loss** (Dinomaly's hard-mining quantile, INP-Former's soft-mining
  mean distance): taken over the global batch (:func:`gather_rows`, :func:`global_mean`), so
  a DDP step computes the loss a single process computes on the union of the ranks' batches
  (DDP then averages gradients, which is that loss's gradient).

Outside DDP (or before the process group exists) every function is the identity.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import distributed as dist
from torch.utils.data import DataLoader


def is_distributed() -> bool:
    """Whether a process group with more than one rank is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def full_training_loader(trainer: Any) -> DataLoader | None:  # noqa: ANN401
    """Every training image once, in dataset order, unsharded: the same batches on every rank.

    Built from ``trainer.datamodule.train_data`` (anomalib datamodules, ours included) with the
    *evaluation* batch size (an inference pass; it also keeps the batches, hence the float
    arithmetic, independent of the per-rank training batch), the workers and collate function,
    never shuffled and never split across ranks. Without such a datamodule: in one process the trainer's own training dataloader (it
    holds the whole set); under DDP ``None`` is not an option (the shard would silently build
    another memory), so a clear error.

    Raises:
        RuntimeError: under DDP with no datamodule exposing ``train_data``.
    """
    datamodule = getattr(trainer, "datamodule", None) if trainer is not None else None
    dataset = getattr(datamodule, "train_data", None)
    if dataset is not None:
        collate = getattr(datamodule, "external_collate_fn", None) or getattr(dataset, "collate_fn", None)
        return DataLoader(
            dataset,
            batch_size=int(getattr(datamodule, "eval_batch_size", 0) or getattr(datamodule, "train_batch_size", 1) or 1),
            shuffle=False,
            num_workers=int(getattr(datamodule, "num_workers", 0) or 0),
            collate_fn=collate,
        )
    if is_distributed():
        msg = (
            "Under DDP this model builds its memory from the whole training set on every rank, which needs a "
            "datamodule with a 'train_data' dataset (anomalib's datamodules and MultiClassDataModule have one); "
            "plain dataloaders passed to fit() are sharded across ranks"
        )
        raise RuntimeError(msg)
    return getattr(trainer, "train_dataloader", None) if trainer is not None else None


def collect_batches(loader: Iterable[Any], extract: Callable[[Any], tuple[torch.Tensor, ...]]) -> tuple[torch.Tensor, ...]:  # noqa: ANN401
    """``extract(batch)`` for every batch of ``loader``, each output concatenated along dim 0 (as ``torch.cat``).

    Every output has one row per image of the batch. When the loader's dataset has a length (the
    full-training-set pass of :func:`full_training_loader`), the outputs are written into tensors
    of that many rows allocated at the first batch: the pass holds the training set's features
    once, where a list of batches plus its concatenation holds them twice at the end. Otherwise (or
    if the loader yields more rows than its dataset) the batches are concatenated. Returns ``()``
    for an empty loader.
    """
    try:
        total: int | None = len(loader.dataset)  # type: ignore[attr-defined]
    except (AttributeError, TypeError):
        total = None
    parts: list[tuple[torch.Tensor, ...]] = []
    out: tuple[torch.Tensor, ...] | None = None
    filled = 0
    for batch in loader:
        values = extract(batch)
        rows = values[0].shape[0]
        if out is None and total is not None and not parts:
            out = tuple(v.new_empty((total, *v.shape[1:])) for v in values)
        if out is not None and not parts and filled + rows <= out[0].shape[0]:
            for target, value in zip(out, values, strict=True):
                target[filled : filled + rows] = value
            filled += rows
        else:
            parts.append(values)
    if not parts:
        return () if out is None else tuple(t[:filled] for t in out)
    if out is not None:
        parts.insert(0, tuple(t[:filled] for t in out))
    return tuple(torch.cat(column) for column in zip(*parts, strict=True))


def reduce_min(tensor: torch.Tensor) -> torch.Tensor:
    """Elementwise minimum over ranks (a copy; the input itself outside DDP)."""
    if not is_distributed():
        return tensor
    result = tensor.detach().clone()
    dist.all_reduce(result, op=dist.ReduceOp.MIN)
    return result


def global_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Mean of ``tensor``'s elements over every rank's elements (``tensor.mean()`` outside DDP).

    Exact for unequal per-rank sizes (sums and counts are reduced, not means). No gradient.
    """
    if not is_distributed():
        return tensor.mean()
    totals = torch.stack([tensor.detach().sum().double(), torch.tensor(float(tensor.numel()), dtype=torch.float64, device=tensor.device)])
    dist.all_reduce(totals, op=dist.ReduceOp.SUM)
    return (totals[0] / totals[1]).to(tensor.dtype)


def gather_rows(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's ``tensor`` along dim 0, rank 0's rows first (sizes may differ).

    Same result on every rank; the input itself outside DDP. Rows are padded to the largest
    rank's count for ``all_gather`` and the padding dropped.
    """
    if not is_distributed():
        return tensor
    world = dist.get_world_size()
    size = torch.tensor([tensor.shape[0]], device=tensor.device, dtype=torch.long)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    counts = [int(s.item()) for s in sizes]
    longest = max(counts)
    flag = tensor.dtype == torch.bool  # gloo gathers no booleans
    padded = tensor.detach().to(torch.uint8) if flag else tensor.detach()
    if tensor.shape[0] < longest:
        pad = padded.new_zeros((longest - tensor.shape[0], *tensor.shape[1:]))
        padded = torch.cat([padded, pad])
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded.contiguous())
    rows = torch.cat([part[:count] for part, count in zip(parts, counts, strict=True)])
    return rows.bool() if flag else rows
