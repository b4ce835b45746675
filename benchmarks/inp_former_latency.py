"""Batch-1 CPU inference latency: our InpFormer vs anomalib's built-in, torch eager and OpenVINO FP32.

Paper setting by default: ViT-B/14 with registers, input 392x392. Both models are random (no
download is attempted; latency does not depend on weight values); each runs with its own
defaults. Before timing, each OpenVINO model is checked against its torch model. Runs of the
two models alternate every round; medians and the ratio ours / built-in are printed.

Usage::

    python benchmarks/inp_former_latency.py [--runs 15] [--warmup 3] [--threads 2] [--size 392]
        [--encoder vit_base_patch14_reg4_dinov2] [--skip-openvino]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn
from anomalib_mcad.compare.profiling import ScoreAndMap, interleaved

sys.path.insert(0, str(Path(__file__).resolve().parent))
import builtin_inp_former as bi  # noqa: E402

TORCH_TARGET = 0.9
OPENVINO_TARGET = 1.0


def to_openvino(model: nn.Module, x: torch.Tensor, workdir: Path, name: str) -> Callable[[np.ndarray], list[np.ndarray]]:
    """Export through ONNX (as anomalib does) and compile for CPU in FP32."""
    import openvino as ov  # noqa: PLC0415

    path = workdir / f"{name}.onnx"
    # dynamo export as anomalib's; TorchScript tracing cannot take ours (DINOv2's scale_factor resize)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(ScoreAndMap(model).eval(), (x,), str(path), input_names=["input"], output_names=["score", "map"], opset_version=18, dynamo=True, verbose=False)
    compiled = ov.Core().compile_model(ov.convert_model(path), "CPU", {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": str(torch.get_num_threads())})
    return lambda a: [np.asarray(v) for v in compiled(a).values()]


def main() -> None:
    warnings.filterwarnings("ignore")
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--size", type=int, default=392)
    ap.add_argument("--encoder", default="vit_base_patch14_reg4_dinov2")
    ap.add_argument("--skip-openvino", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    builtin = bi.build_builtin(args.encoder)
    ours = bi.build_ours(args.encoder, builtin_conventions=False)
    x = torch.randn(1, 3, args.size, args.size, generator=torch.Generator().manual_seed(0))
    print(f"encoder {args.encoder}, input 1x3x{args.size}x{args.size}, {args.threads} threads, {args.runs} runs")
    rows = []
    with torch.inference_mode():
        t = interleaved({"ours": lambda: ours(x), "builtin": lambda: builtin(x)}, args.warmup, args.runs)
    rows.append(("torch eager", t, TORCH_TARGET))
    report(rows[-1:])
    if not args.skip_openvino:
        with tempfile.TemporaryDirectory() as tmp:
            ov_ours = to_openvino(ours, x, Path(tmp), "ours")
            ov_builtin = to_openvino(builtin, x, Path(tmp), "builtin")
            a = x.numpy()
            with torch.inference_mode():
                for name, model, fn in (("ours", ours, ov_ours), ("builtin", builtin, ov_builtin)):
                    ref = model(x)
                    s, m = fn(a)
                    print(f"  OpenVINO FP32 vs torch ({name}): score {abs(float(s.ravel()[0]) - float(ref.pred_score)):.2e}, "
                          f"map {np.abs(m - ref.anomaly_map.numpy()).max():.2e} (max abs)")
            t = interleaved({"ours": lambda: ov_ours(a), "builtin": lambda: ov_builtin(a)}, args.warmup, args.runs)
        rows.append(("OpenVINO FP32", t, OPENVINO_TARGET))
    report(rows)


def report(rows: list) -> None:
    """Markdown table of medians and ratios."""
    print("| backend | ours median ms | built-in median ms | ratio | target |")
    print("| :-- | --: | --: | --: | --: |")
    for name, t, target in rows:
        mo, mb = t["ours"].median, t["builtin"].median
        ratio = mo / mb
        print(f"| {name} | {mo:.1f} | {mb:.1f} | {ratio:.3f} | <= {target} {'ok' if ratio <= target else 'MISSED'} |")


if __name__ == "__main__":
    main()
