"""What INT8 post-training quantization leaves in FP32: the map-smoothing convolutions, found in the OpenVINO graph."""

from __future__ import annotations

import openvino as ov
import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812

from anomalib_mcad.models.components.base import map_smoothing_convolutions


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
