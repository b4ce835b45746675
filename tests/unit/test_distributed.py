"""DDP building blocks that need no process group: the sharded training order and the full training pass."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import torch
from torch.utils.data import DistributedSampler

from anomalib_mcad.data import MultiClassDataModule
from anomalib_mcad.data.multiclass import EpochSeededSampler
from anomalib_mcad.models.components.distributed import collect_batches, full_training_loader, gather_rows, global_mean, reduce_min


def test_rank_shards_of_a_step_are_the_single_process_batch() -> None:
    """What MultiClassDataModule gives each DDP rank: W batches of b together = the single-process batch of W*b."""
    size, seed, world, b = 23, 5, 2, 3
    single = EpochSeededSampler(size, seed)
    ranks = [DistributedSampler(range(size), num_replicas=world, rank=r, shuffle=True, seed=seed) for r in range(world)]
    orders = []
    for epoch in range(3):
        single.set_epoch(epoch)
        for sampler in ranks:
            sampler.set_epoch(epoch)
        whole = list(single)
        shards = [list(sampler) for sampler in ranks]
        for step in range(size // (world * b)):
            together = sorted(i for shard in shards for i in shard[step * b : (step + 1) * b])
            assert together == sorted(whole[step * world * b : (step + 1) * world * b]), (epoch, step)
        orders.append(whole)
    assert orders[0] != orders[1] != orders[2]  # each epoch reshuffles


def test_full_training_loader_reads_every_training_image_in_file_order(synthetic_root: Path) -> None:
    dm = MultiClassDataModule(root=synthetic_root, train_batch_size=3, eval_batch_size=5, num_workers=0)
    dm.setup()
    loader = full_training_loader(SimpleNamespace(datamodule=dm))
    paths = [p for batch in loader for p in batch.image_path]
    assert paths == list(dm.train_data.samples["image_path"])
    assert loader.batch_size == 5
    shuffled = [p for batch in dm.train_dataloader() for p in batch.image_path]
    assert sorted(shuffled) == sorted(paths) and shuffled != paths


def test_reductions_are_the_local_values_without_a_process_group() -> None:
    x = torch.tensor([[1.0, 2.0], [3.0, 5.0]])
    assert gather_rows(x) is x
    assert reduce_min(x) is x
    assert float(global_mean(x)) == 2.75


def test_collect_batches_is_the_concatenation_written_once() -> None:
    """Into tensors of the dataset's size when it has one; concatenated otherwise or when it yields more rows."""
    gen = torch.Generator().manual_seed(0)
    batches = [(torch.randn(n, 2, 3, generator=gen), torch.arange(n)) for n in (4, 4, 2)]
    expected = tuple(torch.cat(column) for column in zip(*batches, strict=True))

    class Loader(list):
        dataset: list

    for size in (10, 12, 7, None):  # exact, fewer rows than the dataset (drop_last), more, unknown
        loader = Loader(batches)
        if size is not None:
            loader.dataset = list(range(size))
        result = collect_batches(loader, lambda batch: batch)
        assert len(result) == 2
        for got, want in zip(result, expected, strict=True):
            assert torch.equal(got, want)
    assert collect_batches(Loader([]), lambda batch: batch) == ()
