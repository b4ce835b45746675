"""What INT8 post-training quantization leaves in FP32, found in the OpenVINO graph: map-smoothing convolutions,
nearest-entry distance products and (for models that ask) what the search's result flows into."""

from __future__ import annotations

import openvino as ov
import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812

from anomalib_mcad.models.components.base import map_smoothing_convolutions, nearest_neighbour_matmuls, search_dependent_products


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
    """Features, a nearest-prototype search over a constant table, and a layer on the residual (a flow's)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Linear(4, 4)
        self.register_buffer("table", torch.rand(6, 4))
        self.flow = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.features(x)
        distance = (z * z).sum(-1, keepdim=True) - 2.0 * z @ self.table.T + (self.table * self.table).sum(-1)
        nearest = self.table[distance.argmin(-1)]
        return self.flow(z - nearest).exp().sum(-1)


def test_distance_product_and_what_the_search_feeds_are_found() -> None:
    model = ov.convert_model(torch.export.export(SearchThenFlow().eval(), (torch.rand(5, 4),)))
    products = {op.get_friendly_name() for op in model.get_ordered_ops() if op.get_type_name() == "MatMul"}
    assert len(products) == 3
    search = nearest_neighbour_matmuls(model)
    after = search_dependent_products(model)
    assert len(search) == 1 and len(after) == 1 and set(search).isdisjoint(after)
    assert products - set(search) - set(after)  # the feature layer before the search stays quantizable
