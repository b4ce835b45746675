"""Batch-1 CPU inference latency: our Dinomaly vs anomalib's built-in, in torch eager and OpenVINO FP32.

Paper setting by default: ViT-B/14 with registers, input 392x392 (resize 448, centre-crop 392).
Both models are randomly initialised (no download is ever attempted); latency does not depend on
the weights' values. Ours runs with its defaults (``DinomalyModel(pretrained=False)``).

Before timing, outputs are checked:

* ours in the built-in's conventions (``mlp_bias=False``, ``pos_embed_interpolation="timm"``,
  ``blur_padding="reflect"``, ``output_map="raw"``) with the built-in's weights copied in must
  match the built-in in torch within 1e-4 (scores and maps, max abs);
* each OpenVINO model must match its own torch model.

Runs of the two models are interleaved (the order alternating each round) so that thermal and
background-load drift hits both alike; medians and inter-quartile ranges are reported, and the
ratio of medians as well as the median of per-round ratios.

Usage::

    python benchmarks/dinomaly_latency.py [--runs 15] [--warmup 3] [--threads N] [--size 392]
        [--encoder vit_base_patch14_reg4_dinov2] [--skip-openvino] [--breakdown]
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from anomalib_mcad.compare.profiling import ScoreAndMap, Timing, interleaved
from anomalib_mcad.models.components.pre_processing import IMAGENET_MEAN, IMAGENET_STD

sys.path.insert(0, str(Path(__file__).resolve().parent))
import builtin_dinomaly as bd  # noqa: E402

TORCH_TARGET = 0.9
OPENVINO_TARGET = 1.0
PARITY_TOL = 1e-4


def paper_input(size: int, seed: int = 0) -> torch.Tensor:
    """A (1, 3, size, size) normalised input: a random 512x512 image resized to size*8/7 and centre-cropped."""
    from torchvision.transforms import v2  # noqa: PLC0415

    image = torch.rand(1, 3, 512, 512, generator=torch.Generator().manual_seed(seed))
    transform = v2.Compose([
        v2.Resize(round(size * 8 / 7), antialias=True),
        v2.CenterCrop(size),
        v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])
    return transform(image).contiguous()


def paired_ratio(ours: Timing, builtin: Timing) -> float:
    """Median over rounds of ours/built-in latency measured in the same round."""
    return statistics.median(o / b for o, b in zip(ours.samples, builtin.samples, strict=True))


def torch_outputs(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(score, map) of an eval model under inference mode."""
    with torch.inference_mode():
        out = model(x)
    return out.pred_score, out.anomaly_map


def to_openvino(model: nn.Module, x: torch.Tensor, threads: int, workdir: Path, name: str) -> Any:  # noqa: ANN401
    """Export a Dinomaly (eval) as anomalib does (dynamo ONNX), convert to OpenVINO, compile FP32 for CPU.

    ``openvino.convert_model`` on the torch module directly (TorchScript tracing) cannot convert
    ours: traced input sizes are tensors, and the DINOv2-style ``scale_factor`` of the
    position-embedding resize then is a tuple of tensors, which ``upsample_bicubic2d`` rejects.
    """
    import openvino as ov  # noqa: PLC0415

    onnx_path = workdir / f"{name}.onnx"
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            ScoreAndMap(model).eval(),
            (x,),
            str(onnx_path),
            dynamo=True,
            opset_version=18,  # anomalib asks for 14; the down-conversion fails and leaves 18 anyway
            input_names=["input"],
            output_names=["pred_score", "anomaly_map"],
            verbose=False,
        )
    ov_model = ov.convert_model(onnx_path)
    layer_norms = sum(op.get_type_name() == "MVN" for op in ov_model.get_ordered_ops())
    print(f"  {name}: {layer_norms} LayerNorms (MVN) in the converted graph")
    config = {
        # The CPU plugin defaults to bf16 on CPUs with avx512_bf16/AMX; FP32 is what we compare.
        "INFERENCE_PRECISION_HINT": "f32",
        "PERFORMANCE_HINT": "LATENCY",
        "INFERENCE_NUM_THREADS": threads,
    }
    return ov.Core().compile_model(ov_model, "CPU", config)


def openvino_outputs(compiled: Any, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:  # noqa: ANN401
    """(score, map) of a compiled OpenVINO Dinomaly."""
    result = compiled(x)
    return result[0], result[1]


def stage_breakdown(ours: nn.Module, builtin: nn.Module, x: torch.Tensor, warmup: int, runs: int) -> None:
    """Print the median time of encoder, bottleneck+decoder and map/score stages of both models."""
    from anomalib_mcad.models.components.anomaly_map import cosine_distance_map  # noqa: PLC0415
    from anomalib_mcad.models.image.dinomaly.torch_model import DinomalyModel  # noqa: PLC0415

    assert isinstance(ours, DinomalyModel)
    size = tuple(x.shape[-2:])
    with torch.inference_mode():
        enc_o = ours.encoder(x)
        enc_b = builtin.encoder(x)
        en_o, de_o = ours.features(x)
        en_b, de_b = builtin.get_encoder_decoder_outputs(x)

        def ours_decoder() -> None:
            y = ours.bottleneck(torch.stack(enc_o, dim=1).mean(dim=1))
            for block in ours.decoder:
                y = block(y)

        def builtin_decoder() -> None:
            feats = [enc_b[f"blocks.{i}"] for i in builtin.target_layers]
            y = builtin._fuse_feature(feats)  # noqa: SLF001
            for block in builtin.bottleneck:
                y = block(y)
            for block in builtin.decoder:
                y = block(y, attn_mask=None)

        def builtin_scorer() -> None:
            amap, _ = builtin.calculate_anomaly_maps(en_b, de_b, out_size=size)
            small = torch.nn.functional.interpolate(amap, size=256, mode="bilinear", align_corners=False)
            small = builtin.gaussian_blur(small)
            flat = small.flatten(1)
            torch.sort(flat, dim=1, descending=True)[0][:, : int(flat.shape[1] * 0.01)].mean(dim=1)

        stages = {
            "ours encoder": lambda: ours.encoder(x),
            "builtin encoder": lambda: builtin.encoder(x),
            "ours pos-embed resize": lambda: ours.encoder.interpolated_pos_embed(*ours.encoder.patch_grid(*size)),
            "ours bottleneck+decoder": ours_decoder,
            "builtin bottleneck+decoder": builtin_decoder,
            "ours map+score": lambda: ours.scorer(cosine_distance_map(en_o, de_o, size)),
            "builtin map+score": builtin_scorer,
        }
        timings = interleaved(stages, warmup, runs)
    print("\nStage breakdown (torch eager, median ms [IQR]):")
    for name, timing in timings.items():
        print(f"  {name:<28} {timing.median:9.2f}  [{timing.iqr:6.2f}]")


def main(argv: list[str] | None = None) -> int:
    """Build, check, time and print the table; exit status 1 if an output check fails."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=15, help="timed runs per model and backend")
    parser.add_argument("--warmup", type=int, default=3, help="untimed warm-up runs per model and backend")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="intra-op threads (torch and OpenVINO)")
    parser.add_argument("--size", type=int, default=392, help="input side (the paper: 392 = centre crop of 448)")
    parser.add_argument("--encoder", default="vit_base_patch14_reg4_dinov2", help="timm DINOv2 encoder name")
    parser.add_argument("--skip-openvino", action="store_true", help="time torch eager only")
    parser.add_argument("--breakdown", action="store_true", help="also time the stages of both models")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", category=FutureWarning)
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    torch.set_num_threads(args.threads)

    import openvino  # noqa: PLC0415

    print(
        f"encoder {args.encoder}, input 1x3x{args.size}x{args.size}, threads {args.threads}, "
        f"warm-up {args.warmup}, runs {args.runs}; torch {torch.__version__}, openvino {openvino.__version__}; "
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}",
    )
    x = paper_input(args.size)

    builtin = bd.build_builtin(args.encoder, seed=0)
    bd.spread_layer_scales_(builtin)  # make every encoder block matter for the output check
    parity = bd.build_ours(args.encoder, builtin_conventions=True)
    report = bd.copy_builtin_weights(builtin, parity)
    print(f"weights copied: {len(report.assigned)} tensors; built-in unused: {report.unused_summary()}; ours unassigned: {report.missing or 'none'}")
    ours = bd.build_ours(args.encoder, builtin_conventions=False)  # our defaults
    bd.copy_builtin_weights(builtin, ours)  # bottleneck/decoder MLP biases keep their zero init

    ok = True
    score_b, map_b = torch_outputs(builtin, x)
    score_p, map_p = torch_outputs(parity, x)
    d_score, d_map = bd.max_abs_diff(score_b, score_p), bd.max_abs_diff(map_b, map_p)
    parity_ok = d_score <= PARITY_TOL and d_map <= PARITY_TOL
    ok &= parity_ok
    print(
        f"torch parity, ours in built-in conventions vs built-in: score {d_score:.2e}, map {d_map:.2e} "
        f"(tol {PARITY_TOL:g}) -> {'OK' if parity_ok else 'FAIL'}",
    )
    score_o, map_o = torch_outputs(ours, x)
    print(
        f"ours with default conventions vs built-in: score {bd.max_abs_diff(score_b, score_o):.2e}, "
        f"map {bd.max_abs_diff(map_b, map_o):.2e} (expected to differ)",
    )
    del parity
    gc.collect()

    with torch.inference_mode():
        torch_times = interleaved({"ours": lambda: ours(x), "built-in": lambda: builtin(x)}, args.warmup, args.runs)

    ov_times: dict[str, Timing] = {}
    if not args.skip_openvino:
        x_np = x.numpy()
        compiled = {}
        workdir = Path(tempfile.mkdtemp(prefix="dinomaly_latency_"))
        for name, model, (score_t, map_t) in (("ours", ours, (score_o, map_o)), ("built-in", builtin, (score_b, map_b))):
            start = time.perf_counter()
            compiled[name] = to_openvino(model, x, args.threads, workdir, name.replace("-", ""))
            score_v, map_v = openvino_outputs(compiled[name], x_np)
            ds = bd.max_abs_diff(score_t, torch.from_numpy(np.asarray(score_v)))
            dm = bd.max_abs_diff(map_t, torch.from_numpy(np.asarray(map_v)))
            ov_ok = ds <= PARITY_TOL and dm <= PARITY_TOL
            ok &= ov_ok
            print(
                f"OpenVINO {name} vs its torch model: score {ds:.2e}, map {dm:.2e} "
                f"-> {'OK' if ov_ok else 'FAIL'} (export+convert+compile {time.perf_counter() - start:.0f} s)",
            )
        shutil.rmtree(workdir, ignore_errors=True)
        ov_times = interleaved({n: (lambda c=c: c(x_np)) for n, c in compiled.items()}, args.warmup, args.runs)

    def cell(timings: dict[str, Timing], name: str) -> str:
        return f"{timings[name].median:8.1f} ±{timings[name].iqr:6.1f}" if timings else f"{'-':>16}"

    print()
    print(f"| {'model':<9} | {'torch ms (median ±IQR)':>23} | {'OpenVINO ms (median ±IQR)':>26} |")
    print(f"|{'-' * 11}|{'-' * 25}|{'-' * 28}|")
    for name in ("ours", "built-in"):
        print(f"| {name:<9} | {cell(torch_times, name):>23} | {cell(ov_times, name):>26} |")
    torch_ratio = torch_times["ours"].median / torch_times["built-in"].median
    line = (
        f"| {'ours/b-in':<9} | {torch_ratio:>17.3f} {'OK' if torch_ratio <= TORCH_TARGET else 'MISS':>5} |"
    )
    if ov_times:
        ov_ratio = ov_times["ours"].median / ov_times["built-in"].median
        line += f" {ov_ratio:>20.3f} {'OK' if ov_ratio <= OPENVINO_TARGET else 'MISS':>5} |"
    else:
        line += f" {'-':>26} |"
    print(line)
    paired = f"paired per-round ratio (median): torch {paired_ratio(torch_times['ours'], torch_times['built-in']):.3f}"
    if ov_times:
        paired += f", OpenVINO {paired_ratio(ov_times['ours'], ov_times['built-in']):.3f}"
    print(paired)
    print(f"targets: ours/built-in <= {TORCH_TARGET} in torch, <= {OPENVINO_TARGET} in OpenVINO")

    print(f"load average at the end {os.getloadavg()[0]:.2f} (other processes inflate times and IQRs)")

    if args.breakdown:
        stage_breakdown(ours, builtin, x, args.warmup, args.runs)
    if not ok:
        print("an output check FAILED (see the lines marked FAIL above)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
