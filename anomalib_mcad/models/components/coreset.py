"""Coreset subsampling and an exportable nearest-neighbour memory bank.

Shared by MaskAD (nominal visual feature pool for the reference map) and PMAD's ProtoFlow
(nominal prototypes). The greedy selection is anomalib's
:class:`~anomalib.models.components.sampling.KCenterGreedy` (PatchCore's sampler) where it
projects the features, and an O(N)-memory matrix-vector version of the same greedy on exact
features; this module adds a seed, an exact-count option and clear errors, and a bank whose search is plain
matmul/argmin so it traces into ONNX/OpenVINO.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from anomalib.models.components.dimensionality_reduction import SparseRandomProjection
from anomalib.models.components.sampling import KCenterGreedy
from torch import nn
from torch.nn import functional as F  # noqa: N812

from anomalib_mcad.models.components.validation import NotFittedError, is_exporting


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Seed torch's and numpy's global RNGs for the block, then restore them.

    KCenterGreedy draws its start point from torch's global RNG and its sparse random projection
    from torch's and numpy's global RNGs (it has no seed argument).
    """
    np_state = np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        np.random.seed(seed % 2**32)  # noqa: NPY002 - KCenterGreedy uses the global numpy RNG
        try:
            yield
        finally:
            np.random.set_state(np_state)  # noqa: NPY002


def coreset_size(n_features: int, sampling_ratio: float | None = None, n_samples: int | None = None) -> int:
    """Number of rows a coreset keeps: ``n_samples`` or ``int(n * sampling_ratio)``, at least 1."""
    if (sampling_ratio is None) == (n_samples is None):
        msg = "Give exactly one of sampling_ratio and n_samples"
        raise ValueError(msg)
    if n_samples is not None:
        if n_samples < 1:
            msg = f"n_samples must be >= 1, got {n_samples}"
            raise ValueError(msg)
        return min(int(n_samples), n_features)
    if not 0.0 < float(sampling_ratio) <= 1.0:  # type: ignore[arg-type]
        msg = f"sampling_ratio must be in (0, 1], got {sampling_ratio}"
        raise ValueError(msg)
    return max(1, int(n_features * float(sampling_ratio)))  # type: ignore[arg-type]


def kcenter_greedy_indices(
    features: torch.Tensor,
    sampling_ratio: float | None = None,
    n_samples: int | None = None,
    seed: int = 0,
    project: bool | None = None,
) -> torch.Tensor:
    """Indices of a k-center-greedy coreset of ``features`` (N, D), deterministic for a seed.

    Args:
        features: rows to subsample.
        sampling_ratio: keep ``int(N * ratio)`` rows (at least one); or
        n_samples: keep this many rows (capped at N).
        seed: seeds the start point and the random projection.
        project: run the greedy search in anomalib's sparse random projection (PatchCore's speed
            trick, distances preserved approximately); ``False`` searches the exact features;
            ``None`` projects only when the projection has fewer dimensions than D.

    Returns:
        LongTensor (k,) of distinct row indices, on ``features``' device.
    """
    if features.ndim != 2:
        msg = f"features must be (N, D), got shape {tuple(features.shape)}"
        raise ValueError(msg)
    n_features = features.shape[0]
    if n_features == 0:
        msg = "Cannot build a coreset from an empty feature set (no training features were collected)"
        raise ValueError(msg)
    size = coreset_size(n_features, sampling_ratio, n_samples)
    if size >= n_features:
        return torch.arange(n_features, device=features.device)
    embedding = features.detach().float()
    if project is None:
        project = SparseRandomProjection._johnson_lindenstrauss_min_dim(n_features, eps=0.9) < features.shape[1]  # noqa: SLF001
    if not project:
        return _exact_kcenter_greedy(embedding, size, seed)
    sampler = KCenterGreedy(embedding, sampling_ratio=1.0)
    sampler.coreset_size = size
    with _seeded(seed):
        indices = sampler.select_coreset_idxs()
    return torch.as_tensor(indices, dtype=torch.long, device=features.device)


def _exact_kcenter_greedy(x: torch.Tensor, size: int, seed: int) -> torch.Tensor:
    """k-center greedy on exact distances with O(N) state: one matrix-vector product per pick.

    The start row is KCenterGreedy's (torch seeded with ``seed``), and each pick is the row
    farthest from the picks so far, as there; the squared distance ``|x|^2 - 2 x.c + |c|^2`` is
    one matvec, where anomalib's sampler builds an (N, D) difference per pick (about 10x slower
    on CPU, and its exact mode held tens of GB on 35k x 192 rows: MaskAD was OOM-killed on ELPV).
    """
    n = x.shape[0]
    norms = (x * x).sum(1)
    with _seeded(seed):
        index = int(torch.randint(high=n, size=(1,)).item())
    picked = [index]
    nearest = torch.full((n,), float("inf"), device=x.device)
    for _ in range(size - 1):
        nearest = torch.minimum(nearest, (norms - 2.0 * (x @ x[index]) + norms[index]).clamp_min_(0.0))
        nearest[index] = 0.0
        index = int(torch.argmax(nearest).item())
        picked.append(index)
    return torch.tensor(picked, dtype=torch.long, device=x.device)


def per_category_coreset_indices(
    features: torch.Tensor,
    labels: torch.Tensor,
    sampling_ratio: float,
    seed: int = 0,
    project: bool | None = None,
) -> torch.Tensor:
    """Row indices of a ``sampling_ratio`` k-center-greedy coreset of each category's rows, concatenated (category order).

    ``features`` is (N, D) rows with ``labels`` (N,), or (N, G, D): N items of G rows each (an
    image's patches, possibly a strided view such as a permuted feature map) with one label per
    item; the indices then count rows of the (N * G, D) flattening, in the same order. Only one
    category's rows are copied at a time, so a caller never needs a flattened copy of everything.
    """
    if features.ndim not in (2, 3) or features.shape[0] == 0:
        msg = f"a per-category coreset needs a non-empty (N, D) or (N, G, D) tensor, got shape {tuple(features.shape)}"
        raise ValueError(msg)
    group = features.shape[1] if features.ndim == 3 else 1
    kept = []
    for category in torch.unique(labels).tolist():
        items = torch.nonzero(labels == category).squeeze(1)
        rows = (items[:, None] * group + torch.arange(group, device=items.device)).reshape(-1) if group > 1 else items
        if sampling_ratio >= 1.0:
            kept.append(rows)
            continue
        category_rows = features[items].reshape(-1, features.shape[-1])
        kept.append(rows[kcenter_greedy_indices(category_rows, sampling_ratio=sampling_ratio, seed=seed, project=project)])
        del category_rows
    return torch.cat(kept)


def search_block(columns: int) -> int:
    """Columns per block of :func:`blockwise_min` over ``columns`` candidates: ``ceil(sqrt(columns))``."""
    return max(1, math.ceil(math.sqrt(columns)))


def blockwise_min(values: torch.Tensor, block: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``values.min(dim=1)`` of a 2-D tensor in two stages: the block holding the minimum, then the minimum within it.

    Same values and indices as ``min(dim=1)`` (the first minimal column; padding columns are
    +inf and come last). Why: an export turns ``argmin`` into OpenVINO's *stable* ``TopK``, which
    on a (784, 28,000) distance matrix took 46 ms on 2 cores; a ``ReduceMin`` per block and two
    ``TopK`` over ``sqrt(M)`` columns take 6 ms. ``block``: columns per block (default
    :func:`search_block`); a column count that is a multiple of it needs no padding (OpenVINO's
    ``Pad`` of the matrix alone took 9 ms).
    """
    rows, columns = values.shape
    block = search_block(columns) if block is None else int(block)
    blocks = -(-columns // block)
    if blocks * block != columns:
        values = F.pad(values, (0, blocks * block - columns), value=float("inf"))
    blocked = values.reshape(rows, blocks, block)
    _, block_index = blocked.amin(dim=2).min(dim=1)
    within = torch.gather(blocked, 1, block_index.reshape(rows, 1, 1).expand(rows, 1, block)).squeeze(1)
    minimum, offset = within.min(dim=1)
    return minimum, block_index * block + offset


#: Largest query x memory distance block (elements, float32: 64 MiB) one eager search holds at a time.
DISTANCE_BLOCK_ELEMENTS = 1 << 24


def block_rows(n_memory: int, chunk_size: int) -> int:
    """Queries per distance block: ``chunk_size``, fewer when the block would pass ``DISTANCE_BLOCK_ELEMENTS``."""
    return max(1, min(int(chunk_size), DISTANCE_BLOCK_ELEMENTS // max(1, int(n_memory))))


def _in_place_allowed(*tensors: torch.Tensor) -> bool:
    """True outside export and autograd: a distance block may then be formed and masked in place."""
    return not (is_exporting() or (torch.is_grad_enabled() and any(t.requires_grad for t in tensors)))


def squared_distances(query: torch.Tensor, memory: torch.Tensor, memory_sq: torch.Tensor, query_norm: bool = True) -> torch.Tensor:
    """``|q|^2 - 2 q m^T + |m|^2`` (Q, M) for query rows (Q, D), memory rows (M, D) and their squared norms (M,).

    ``query_norm=False`` leaves out ``|q|^2``, which does not change which row is nearest (a search
    adds it to the minimum only). Outside export and autograd the sum is formed in place in the
    matmul's output, one (Q, M) buffer instead of three, with the same rounding (``-b + a`` is
    ``a - b`` in IEEE arithmetic, and ``(2 q) m^T`` is ``2 (q m^T)``).
    """
    if not _in_place_allowed(query, memory):
        product = 2.0 * query @ memory.T
        return (query * query).sum(1, keepdim=True) - product + memory_sq if query_norm else memory_sq - product
    block = ((2.0 * query) @ memory.T).neg_()
    if query_norm:
        block.add_((query * query).sum(1, keepdim=True))
    return block.add_(memory_sq)


class NearestNeighbourBank(nn.Module):
    """A memory of feature rows with a category label each, searched by exact L2 distance.

    Buffers ``memory`` (M, D) and ``labels`` (M,) are empty until :meth:`fit`; they are saved in
    the state dict and resized when a checkpoint is loaded, as anomalib's PatchCore does.

    The search is ``|m|^2 - 2 q m^T`` followed by its row minimum (:func:`blockwise_min` in an
    exported graph) and a gather, and ``|q|^2`` is added to the minimum only (it does not change
    which row is nearest, and one pass over the distance matrix less is 4 ms of a 28,000-row
    search): no data-dependent Python branching, so it exports. Restricting to a category sets the other rows' distances
    to +inf.

    Args:
        chunk_size: queries per distance block in eager mode, fewer for a big bank (a block holds
            at most ``DISTANCE_BLOCK_ELEMENTS`` distances: 64 MiB); an exported graph searches all
            queries in one block so its batch size stays dynamic.
    """

    def __init__(self, chunk_size: int = 4096) -> None:
        super().__init__()
        self.chunk_size = int(chunk_size)
        self.register_buffer("memory", torch.empty(0, 0))
        self.register_buffer("labels", torch.empty(0, dtype=torch.long))
        self.memory: torch.Tensor
        self.labels: torch.Tensor

    @property
    def is_empty(self) -> bool:
        """True before :meth:`fit`."""
        return self.memory.shape[0] == 0

    def fit(self, features: torch.Tensor, labels: torch.Tensor | None = None) -> None:
        """Store ``features`` (M, D) with their category ``labels`` (M,) (all zero if None)."""
        if features.ndim != 2 or features.shape[0] == 0:
            msg = f"NearestNeighbourBank.fit needs a non-empty (M, D) tensor, got shape {tuple(features.shape)}"
            raise ValueError(msg)
        if labels is None:
            labels = torch.zeros(features.shape[0], dtype=torch.long, device=features.device)
        if labels.shape != (features.shape[0],):
            msg = f"labels must be ({features.shape[0]},), got {tuple(labels.shape)}"
            raise ValueError(msg)
        self.memory = features.detach().float().contiguous().to(self.memory.device)
        self.labels = labels.detach().long().to(self.memory.device)

    def fit_per_category(
        self,
        features: torch.Tensor,
        labels: torch.Tensor,
        sampling_ratio: float,
        seed: int = 0,
        project: bool | None = None,
    ) -> None:
        """Fit on a k-center-greedy coreset of each category's rows (``sampling_ratio`` each).

        ``features`` (N, D) with ``labels`` (N,), or (N, G, D) items of G rows with one label per
        item (see :func:`per_category_coreset_indices`): the bank keeps the picked rows only.
        """
        index = per_category_coreset_indices(features, labels, sampling_ratio, seed=seed, project=project)
        if features.ndim == 3:
            group = features.shape[1]
            self.fit(features[index // group, index % group], labels[index // group])
        else:
            self.fit(features[index], labels[index])

    def nearest(
        self,
        query: torch.Tensor,
        category: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Nearest memory row of every query vector.

        Args:
            query: (..., D). With ``category`` it must be (B, ..., D).
            category: optional (B,) category index per batch item; only rows with that label
                are searched (a category with no rows gives +inf distances).

        Returns:
            neighbours (..., D), L2 distances (...), memory indices (...).
        """
        if self.is_empty:
            msg = "The nearest-neighbour bank is empty: fit the model on training data before inference"
            raise NotFittedError(msg)
        if not is_exporting() and query.shape[-1] != self.memory.shape[1]:
            msg = f"query has {query.shape[-1]} channels, the bank holds {self.memory.shape[1]}-d rows"
            raise ValueError(msg)
        lead = query.shape[:-1]
        flat = query.reshape(-1, query.shape[-1])
        if category is not None:
            if not is_exporting() and (query.ndim < 2 or category.shape != query.shape[:1]):
                msg = f"category must be (B,) for a (B, ..., D) query, got {tuple(category.shape)} for {tuple(query.shape)}"
                raise ValueError(msg)
            per_item = flat.shape[0] // query.shape[0]
            row_category = category.to(self.labels.device).long().repeat_interleave(per_item)
        memory, memory_sq, labels = self.memory, (self.memory * self.memory).sum(1), self.labels
        if is_exporting():
            # The table padded to whole blocks of the two-stage minimum (zero rows at +inf, label -1):
            # folded constants of the graph, so the distance matrix needs no run-time padding.
            block = search_block(memory.shape[0])
            pad = -memory.shape[0] % block
            memory, labels = F.pad(memory, (0, 0, 0, pad)), F.pad(labels, (0, pad), value=-1)
            memory_sq = F.pad(memory_sq, (0, pad), value=float("inf"))
        # Exported graphs search in one block: a loop over a dynamic query count would fix it.
        step = flat.shape[0] if is_exporting() else block_rows(self.memory.shape[0], self.chunk_size)
        dists, idxs = [], []
        for start in range(0, flat.shape[0], step) if not is_exporting() else [0]:
            chunk = flat[start : start + step] if not is_exporting() else flat
            partial = squared_distances(chunk, memory, memory_sq, query_norm=False)
            if category is not None:
                rows = row_category[start : start + step] if not is_exporting() else row_category
                other = rows[:, None] != labels[None, :]
                partial = partial.masked_fill_(other, float("inf")) if _in_place_allowed(chunk, memory) else partial.masked_fill(other, float("inf"))
            # OpenVINO runs an exported argmin as a slow stable TopK (blockwise_min); eager torch's min is one pass, no copy
            dist, idx = blockwise_min(partial, block) if is_exporting() else partial.min(dim=1)
            dists.append(dist + (chunk * chunk).sum(1))
            idxs.append(idx)
        sq_dist = torch.cat(dists)
        index = torch.cat(idxs)
        neighbours = self.memory[index].reshape(*lead, -1)
        return neighbours, sq_dist.clamp_min(0).sqrt().reshape(lead), index.reshape(lead)

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:  # noqa: ANN401
        """Resize the empty buffers to the checkpoint's shapes before loading."""
        for name in ("memory", "labels"):
            key = prefix + name
            if key in state_dict:
                setattr(self, name, torch.empty_like(state_dict[key], device=getattr(self, name).device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
