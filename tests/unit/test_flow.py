"""The shared conditional normalizing flow: shapes, invertibility, training, export parity."""

from __future__ import annotations

import pytest
import torch

from anomalib_mcad.models.components.flow import ConditionalFlow


def tiny_flow(condition_dim: int = 8) -> ConditionalFlow:
    torch.manual_seed(0)
    return ConditionalFlow(in_channels=6, n_coupling=2, condition_dim=condition_dim, hidden_ratio=1.0)


@pytest.mark.parametrize("condition_dim", [0, 8])
def test_shapes_and_change_of_variables(condition_dim: int) -> None:
    flow = tiny_flow(condition_dim)
    features = torch.randn(2, 6, 3, 4)
    z, log_jac = flow(features)
    assert z.shape == features.shape
    assert log_jac.shape == (2, 3, 4)
    nll = flow.nll(features)
    expected = (0.5 * (z**2).sum(1) + 3 * torch.log(torch.tensor(2 * torch.pi)) - log_jac) / 6
    assert torch.allclose(nll, expected, atol=1e-5)
    assert torch.allclose(flow.abnormality(features), z.norm(dim=1), atol=1e-5)
    # invertible: the reverse pass recovers the input patches
    patches = features.permute(0, 2, 3, 1).reshape(-1, 6)
    cond: list[torch.Tensor] = []
    if condition_dim:
        from anomalib.models.image.cflow.utils import positional_encoding_2d  # noqa: PLC0415

        pos = positional_encoding_2d(condition_dim, 3, 4).permute(1, 2, 0).reshape(1, 12, -1).expand(2, -1, -1)
        cond = [pos.reshape(-1, condition_dim)]
    z_flat = z.permute(0, 2, 3, 1).reshape(-1, 6)
    back, _ = flow.flow(z_flat, c=cond, rev=True)
    assert torch.allclose(back, patches, atol=1e-4)


def test_condition_depends_on_position() -> None:
    """The same vector at every position maps to different latents when conditioned."""
    flow = tiny_flow(8)
    for p in flow.parameters():  # non-trivial couplings
        torch.nn.init.normal_(p, std=0.3)
    features = torch.randn(1, 6, 1, 1).expand(1, 6, 3, 3).contiguous()
    z, _ = flow(features)
    assert (z[..., 0, 0] - z[..., 2, 2]).abs().max() > 1e-3


def test_training_lowers_nll_and_ranks_outliers_higher() -> None:
    torch.manual_seed(0)
    flow = ConditionalFlow(in_channels=4, n_coupling=2, condition_dim=4, hidden_ratio=1.0)
    normal = 0.1 * torch.randn(32, 4, 2, 2) + 2.0
    optimizer = torch.optim.Adam(flow.parameters(), lr=1e-2)
    first = flow.nll(normal).mean().item()
    for _ in range(60):
        optimizer.zero_grad()
        loss = flow.nll(normal).mean()
        loss.backward()
        optimizer.step()
    assert loss.item() < first - 1.0
    outlier = normal[:4].clone()
    outlier[:, :, 0, 0] -= 3.0
    scores = flow.abnormality(outlier)
    assert (scores[:, 0, 0] > scores[:, 1, 1]).all()


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="multiple of 4"):
        ConditionalFlow(8, condition_dim=6)
    with pytest.raises(ValueError, match="at least 2 channels"):
        ConditionalFlow(1)
    with pytest.raises(ValueError, match="expects"):
        tiny_flow()(torch.randn(1, 5, 2, 2))


def test_openvino_matches_torch(tmp_path) -> None:  # noqa: ANN001
    """ONNX export read by OpenVINO (f32): abnormality within 1e-4 relative of torch."""
    import openvino as ov  # noqa: PLC0415

    flow = tiny_flow(8).eval()
    for p in flow.parameters():
        torch.nn.init.normal_(p, std=0.3)

    class Score(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.flow = flow

        def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return self.flow.abnormality(features), self.flow.nll(features)

    features = torch.randn(2, 6, 3, 3)
    path = tmp_path / "flow.onnx"
    torch.onnx.export(Score(), (features,), path, dynamo=False)
    compiled = ov.Core().compile_model(str(path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    outputs = compiled([features.numpy()])
    with torch.no_grad():
        expected = Score()(features)
    for got, want in zip((outputs[0], outputs[1]), expected, strict=True):
        assert torch.allclose(torch.from_numpy(got), want, rtol=1e-4, atol=1e-4)


def test_flow_pickles_for_torch_export() -> None:
    """anomalib's torch export pickles the whole module; FrEIA's lambda activation is replaced."""
    import io  # noqa: PLC0415

    flow = tiny_flow(8).eval()
    features = torch.randn(1, 6, 3, 3)
    buffer = io.BytesIO()
    torch.save(flow, buffer)
    buffer.seek(0)
    restored = torch.load(buffer, weights_only=False)
    with torch.no_grad():
        torch.testing.assert_close(restored.abnormality(features), flow.abnormality(features))
