"""k-center-greedy coreset indices and the exportable nearest-neighbour bank."""

from __future__ import annotations

import pytest
import torch

from anomalib_mcad.models.components.validation import NotFittedError
from anomalib_mcad.models.components.coreset import NearestNeighbourBank, blockwise_min, kcenter_greedy_indices


def test_kcenter_greedy_is_deterministic_for_a_seed_and_distinct() -> None:
    features = torch.randn(300, 8, generator=torch.Generator().manual_seed(0))
    first = kcenter_greedy_indices(features, sampling_ratio=0.1, seed=3)
    assert first.shape == (30,)
    assert first.dtype == torch.long
    assert len(set(first.tolist())) == 30
    assert torch.equal(first, kcenter_greedy_indices(features, sampling_ratio=0.1, seed=3))
    assert not torch.equal(first, kcenter_greedy_indices(features, sampling_ratio=0.1, seed=4))
    assert kcenter_greedy_indices(features, n_samples=7, seed=0).shape == (7,)
    assert kcenter_greedy_indices(features, n_samples=1000).shape == (300,)


def test_kcenter_greedy_covers_far_clusters() -> None:
    """Four tight, far-apart clusters: a 4-point k-center coreset takes one point from each."""
    centres = torch.tensor([[0.0, 0.0], [100.0, 0.0], [0.0, 100.0], [100.0, 100.0]])
    features = (centres[:, None] + 0.01 * torch.randn(4, 50, 2)).reshape(200, 2)
    picked = kcenter_greedy_indices(features, n_samples=4, seed=0, project=False)
    assert sorted((picked // 50).tolist()) == [0, 1, 2, 3]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"sampling_ratio": 0.0}, "sampling_ratio must be in"),
        ({"sampling_ratio": 1.5}, "sampling_ratio must be in"),
        ({"n_samples": 0}, "n_samples must be"),
        ({}, "exactly one"),
        ({"sampling_ratio": 0.1, "n_samples": 3}, "exactly one"),
    ],
)
def test_kcenter_greedy_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        kcenter_greedy_indices(torch.randn(10, 3), **kwargs)


def test_kcenter_greedy_empty_input() -> None:
    with pytest.raises(ValueError, match="empty feature set"):
        kcenter_greedy_indices(torch.empty(0, 4), sampling_ratio=0.5)


def test_bank_nearest_matches_cdist_and_category_restriction() -> None:
    gen = torch.Generator().manual_seed(1)
    bank = NearestNeighbourBank(chunk_size=7)  # several chunks
    memory = torch.randn(40, 6, generator=gen)
    labels = torch.arange(40) % 3
    bank.fit(memory, labels)
    query = torch.randn(2, 5, 6, generator=gen)
    neighbours, distances, indices = bank.nearest(query)
    reference = torch.cdist(query.reshape(-1, 6), memory).min(1)
    assert neighbours.shape == (2, 5, 6)
    assert distances.shape == indices.shape == (2, 5)
    assert torch.equal(indices.reshape(-1), reference.indices)
    assert torch.allclose(distances.reshape(-1), reference.values, atol=1e-4)
    assert torch.equal(neighbours, memory[indices])
    _, cat_dist, cat_idx = bank.nearest(query, category=torch.tensor([2, 0]))
    assert (labels[cat_idx[0]] == 2).all()
    assert (labels[cat_idx[1]] == 0).all()
    assert (cat_dist >= distances - 1e-5).all()


def test_bank_fit_per_category_keeps_every_category() -> None:
    features = torch.randn(90, 4)
    labels = torch.arange(90) // 30
    bank = NearestNeighbourBank()
    bank.fit_per_category(features, labels, sampling_ratio=0.2, seed=0)
    assert bank.memory.shape == (18, 4)
    assert torch.bincount(bank.labels).tolist() == [6, 6, 6]


def test_bank_checkpoint_round_trip_resizes_buffers() -> None:
    bank = NearestNeighbourBank()
    bank.fit(torch.randn(12, 3), torch.arange(12) % 2)
    restored = NearestNeighbourBank()
    restored.load_state_dict(bank.state_dict())
    assert torch.equal(restored.memory, bank.memory)
    assert torch.equal(restored.labels, bank.labels)


def test_empty_bank_and_wrong_width_are_clear_errors() -> None:
    bank = NearestNeighbourBank()
    with pytest.raises(NotFittedError, match="bank is empty: fit the model"):
        bank.nearest(torch.randn(2, 3))
    bank.fit(torch.randn(4, 3))
    with pytest.raises(ValueError, match="channels"):
        bank.nearest(torch.randn(2, 5))
    with pytest.raises(ValueError, match="non-empty"):
        bank.fit(torch.empty(0, 3))


def test_bank_search_exports_to_onnx_and_runs_in_openvino(tmp_path) -> None:  # noqa: ANN001
    """ONNX export of the search, read and run by OpenVINO: same neighbours and distances."""
    import openvino as ov  # noqa: PLC0415

    bank = NearestNeighbourBank(chunk_size=4)
    bank.fit(torch.randn(20, 3), torch.arange(20) % 2)

    class Search(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bank = bank

        def forward(self, query: torch.Tensor, category: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            neighbours, distances, _ = self.bank.nearest(query, category)
            return neighbours, distances

    query, category = torch.randn(2, 9, 3), torch.tensor([1, 0])
    path = tmp_path / "bank.onnx"
    torch.onnx.export(Search(), (query, category), path, dynamo=False)
    compiled = ov.Core().compile_model(str(path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    outputs = compiled([query.numpy(), category.numpy()])
    expected = Search()(query, category)
    assert torch.allclose(torch.from_numpy(outputs[0]), expected[0], atol=1e-5)
    assert torch.allclose(torch.from_numpy(outputs[1]), expected[1], atol=1e-4)
    from anomalib_mcad.models.components.base import nearest_neighbour_matmuls  # noqa: PLC0415

    assert len(nearest_neighbour_matmuls(ov.Core().read_model(str(path)))) == 1  # INT8 keeps this product FP32


@pytest.mark.parametrize(("rows", "columns", "block"), [(5, 1, None), (7, 10, None), (64, 2000, None), (3, 101, 7), (4, 9, 20)])
def test_blockwise_min_is_min_over_columns(rows: int, columns: int, block: int | None) -> None:
    values = torch.rand(rows, columns, generator=torch.Generator().manual_seed(columns))
    values[0, columns // 2 :] = values[0].min()  # a tie: the first minimal column wins, as in min()
    minimum, index = blockwise_min(values, block)
    expected = values.min(dim=1)
    assert torch.equal(minimum, expected.values)
    assert torch.equal(index, expected.indices)
    assert int(index[0]) == int(torch.nonzero(values[0] == values[0].min())[0])


def test_blockwise_min_of_a_row_without_candidates_is_inf_at_zero() -> None:
    minimum, index = blockwise_min(torch.full((2, 10), float("inf")))
    assert torch.isinf(minimum).all() and index.tolist() == [0, 0]


def test_exact_greedy_picks_what_anomalibs_sampler_picks() -> None:
    """The O(N) matvec greedy (exact features) gives anomalib's KCenterGreedy's rows: same start, same picks."""
    from anomalib.models.components.sampling import KCenterGreedy

    from anomalib_mcad.models.components.coreset import _seeded

    rows = torch.randn(600, 24, generator=torch.Generator().manual_seed(0))
    for seed in (0, 3):
        ours = kcenter_greedy_indices(rows, sampling_ratio=0.05, seed=seed, project=False)
        sampler = KCenterGreedy(rows.unsqueeze(1), sampling_ratio=1.0)  # 3-D: no projection, exact distances
        sampler.coreset_size = 30
        with _seeded(seed):
            theirs = torch.as_tensor(sampler.select_coreset_idxs(), dtype=torch.long)
        assert ours.shape == (30,) and ours.unique().numel() == 30
        assert torch.equal(ours, theirs)


def test_per_category_coreset_indices_keep_each_category() -> None:
    from anomalib_mcad.models.components.coreset import per_category_coreset_indices

    rows = torch.randn(300, 8, generator=torch.Generator().manual_seed(1))
    labels = torch.arange(300) % 3
    index = per_category_coreset_indices(rows, labels, 0.1, seed=0)
    assert torch.bincount(labels[index]).tolist() == [10, 10, 10] and index.unique().numel() == 30
    assert torch.equal(per_category_coreset_indices(rows, labels, 1.0), torch.cat([torch.nonzero(labels == c).squeeze(1) for c in range(3)]))


def test_bounded_distance_blocks_find_what_one_block_finds(monkeypatch: pytest.MonkeyPatch) -> None:
    """A bank too big for one block searches in fewer-row blocks, summed in place: same distances and picks, bit for bit."""
    from anomalib_mcad.models.components import coreset

    gen = torch.Generator().manual_seed(2)
    bank = NearestNeighbourBank()
    bank.fit(torch.randn(300, 5, generator=gen), torch.arange(300) % 4)
    query = torch.randn(3, 50, 5, generator=gen)
    category = torch.tensor([0, 2, 3])
    whole = bank.nearest(query), bank.nearest(query, category)
    monkeypatch.setattr(coreset, "DISTANCE_BLOCK_ELEMENTS", 300 * 16)  # 16 queries per block
    assert coreset.block_rows(300, 4096) == 16
    for before, after in zip(whole, (bank.nearest(query), bank.nearest(query, category)), strict=True):
        for a, b in zip(before, after, strict=True):
            assert torch.equal(a, b)
    memory_sq = (bank.memory * bank.memory).sum(1)
    flat = query.reshape(-1, 5)
    expected = (flat * flat).sum(1, keepdim=True) - 2.0 * flat @ bank.memory.T + memory_sq
    assert torch.equal(coreset.squared_distances(flat, bank.memory, memory_sq), expected)


def test_per_category_coreset_of_grouped_rows_equals_the_flattened_rows() -> None:
    """(N, G, D) items with one label each (a permuted feature map's view) pick the rows the (N * G, D) flattening picks."""
    from anomalib_mcad.models.components.coreset import per_category_coreset_indices

    gen = torch.Generator().manual_seed(3)
    maps = torch.randn(12, 7, 3, 3, generator=gen)  # (N, C, h, w)
    labels = torch.arange(12) % 3
    grouped = maps.permute(0, 2, 3, 1).flatten(1, 2)  # (N, 9, 7), not contiguous
    flat = maps.permute(0, 2, 3, 1).reshape(-1, 7)
    flat_labels = labels.repeat_interleave(9)
    for ratio in (0.1, 1.0):
        assert torch.equal(per_category_coreset_indices(grouped, labels, ratio, seed=1, project=False), per_category_coreset_indices(flat, flat_labels, ratio, seed=1, project=False))
    by_items, by_rows = NearestNeighbourBank(), NearestNeighbourBank()
    by_items.fit_per_category(grouped, labels, 0.2, seed=0, project=False)
    by_rows.fit_per_category(flat, flat_labels, 0.2, seed=0, project=False)
    assert torch.equal(by_items.memory, by_rows.memory)
    assert torch.equal(by_items.labels, by_rows.labels)
