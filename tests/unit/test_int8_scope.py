"""What INT8 post-training quantization leaves in FP32, found in the OpenVINO graph: map-smoothing convolutions,
nearest-entry distance products the feature network of a search that feeds later products and (for models that ask) what its result flows into."""

from __future__ import annotations

import numpy as np
import openvino as ov
import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812

from anomalib_mcad.models.components.base import (
    INT8_CALIBRATION_IMAGES,
    calibration_indices,
    map_smoothing_convolutions,
    nearest_neighbour_matmuls,
    search_operations,
)


class FeaturesThenBlur(nn.Module):
    """A feature convolution (3 -> 4 channels), a one-channel score map, and its Gaussian-like blur (1 -> 1)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Conv2d(3, 4, 3, padding=1)
        self.register_buffer("kernel", torch.full((1, 1, 5, 5), 1 / 25))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        score_map = self.features(x).pow(2).sum(1, keepdim=True)
        return F.conv2d(score_map, self.kernel, padding=2)


def test_only_the_one_channel_smoothing_convolution_is_found() -> None:
    model = ov.convert_model(torch.export.export(FeaturesThenBlur().eval(), (torch.rand(1, 3, 16, 16),)))
    convolutions = {op.get_friendly_name(): op for op in model.get_ordered_ops() if op.get_type_name() == "Convolution"}
    assert len(convolutions) == 2
    found = map_smoothing_convolutions(model)
    assert len(found) == 1
    weights = convolutions[found[0]].input_value(1).get_partial_shape()
    assert (weights[0].get_length(), weights[1].get_length()) == (1, 1)


class SearchThenFlow(nn.Module):
    """Two searches over constant tables: a prototype search whose residual a layer reads (a flow's), and a
    codebook search whose code only indexes a table (a tokenizer's target)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Linear(4, 4)
        self.register_buffer("table", torch.rand(6, 4))
        self.flow = nn.Linear(4, 4)
        self.encoder = nn.Linear(4, 4)
        self.register_buffer("codebook", torch.rand(5, 4))
        self.register_buffer("code_scores", torch.rand(5))

    @staticmethod
    def nearest(z: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        """Index of the nearest row of ``table`` (squared distances expanded as the models do)."""
        return ((z * z).sum(-1, keepdim=True) - 2.0 * z @ table.T + (table * table).sum(-1)).argmin(-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.features(x)
        residual = z - self.table[self.nearest(z, self.table)]
        code = self.nearest(self.encoder(x), self.codebook)
        return self.flow(residual).exp().sum(-1) * self.code_scores[code]


def test_the_search_that_feeds_a_flow_is_found_not_a_codebook_search() -> None:
    model = ov.convert_model(torch.export.export(SearchThenFlow().eval(), (torch.rand(5, 4),)))
    products = {op.get_friendly_name(): op for op in model.get_ordered_ops() if op.get_type_name() == "MatMul"}
    types = {op.get_friendly_name(): op.get_type_name() for op in model.get_ordered_ops()}
    assert len(products) == 5
    search = nearest_neighbour_matmuls(model)
    query = set(search_operations(model))
    path = set(search_operations(model, after=True))
    assert len(search) == 2 and path.isdisjoint(search) and query < path
    # query side only: of the products, the features layer; the flow after the search stays quantizable
    assert len(query & set(products)) == 1
    assert "Exp" not in {types[n] for n in query}
    # with what the result flows into: the features layer and the flow, with the residual and its exponential
    assert len(path & set(products)) == 2
    assert {"Exp", "Subtract"} <= {types[n] for n in path}
    quantizable = set(products) - set(search) - path
    assert len(quantizable) == 1  # the codebook search's encoder
    (encoder,) = quantizable
    assert products[encoder].input_value(0).get_node().get_type_name() == "Parameter"


def test_calibration_images_span_every_category_of_a_large_training_set() -> None:
    # MVTec-AD-like: 15 categories of 240 training images each, in category order
    categories = [c for c in range(15) for _ in range(240)]
    chosen = calibration_indices(len(categories))
    assert len(chosen) == INT8_CALIBRATION_IMAGES == len(set(chosen))
    assert chosen == sorted(chosen) and chosen[0] == 0 and chosen[-1] == len(categories) - 1
    per_category = np.bincount([categories[i] for i in chosen], minlength=15)
    assert per_category.min() >= 19 and per_category.max() <= 21  # 20 each, give or take the rounding
    assert calibration_indices(42) == list(range(42))  # a small set is used whole
