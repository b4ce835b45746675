"""Export a model to OpenVINO (FP32 and INT8), run anomalib's OpenVINOInferencer on a folder of images,
save anomaly-map overlays, and time torch against OpenVINO.

    python examples/export_and_deploy_openvino.py                                      # --fast: trains a tiny Dinomaly first
    python examples/export_and_deploy_openvino.py --checkpoint example_output/train_all_categories/dinomaly.ckpt \
        --model dinomaly --root ./datasets/MVTecAD --dataset mvtec_ad --images ./datasets/MVTecAD/bottle/test/broken_large
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from anomalib.data.utils import read_image
from anomalib.deploy import CompressionType, ExportType, OpenVINOInferencer
from anomalib.engine import Engine
from lightning.pytorch import seed_everything

from anomalib_mcad import get_model, list_models
from anomalib_mcad.data import MultiClassDataModule
from anomalib_mcad.data.synthetic import generate_synthetic_dataset
from anomalib_mcad.demo import save_figure


def median_ms(run: Callable[[], object], repeats: int) -> float:
    """Median wall time of ``run()`` in milliseconds, after one untimed warm-up call."""
    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(1000 * (time.perf_counter() - start))
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=None, help="a trained checkpoint (default: --fast, train a tiny Dinomaly for 3 steps)")
    parser.add_argument("--model", default="dinomaly", choices=list_models(), help="the checkpoint's model")
    parser.add_argument("--root", type=Path, default=None, help="with --checkpoint: dataset root (INT8 calibrates on its training images)")
    parser.add_argument("--dataset", default="mvtec_ad", help="with --checkpoint: dataset kind of --root")
    parser.add_argument("--images", type=Path, default=None, help="folder of images to score, sub-folders included (default: a test folder of the data)")
    parser.add_argument("--repeats", type=int, default=5, help="timed forwards per runtime")
    parser.add_argument("--output-dir", type=Path, default=Path("example_output/openvino"), help="where everything goes")
    args = parser.parse_args()
    seed_everything(0)
    logging.getLogger("nncf").setLevel(logging.WARNING)  # NNCF lists every operation it leaves in FP32
    out = args.output_dir

    engine = Engine(max_steps=3, default_root_dir=out / "runs", logger=False, devices=1, accelerator="cpu")
    if args.checkpoint is None:
        root = generate_synthetic_dataset(out / "data", categories=["grass", "washer"], image_size=64, n_train=8, n_test_good=2, n_test_per_defect=1)
        datamodule = MultiClassDataModule(root=root, dataset="mvtec_layout", train_batch_size=8, num_workers=0)
        model = get_model("dinomaly", encoder_name="vit_small_patch14_reg4_dinov2", pretrained=False, image_size=64, crop_size=56)
        engine.fit(model, datamodule=datamodule)  # a few steps: enough to fit the post-processor's statistics
        images = args.images or root / "washer" / "test"
    else:
        datamodule = MultiClassDataModule(root=args.root, dataset=args.dataset)
        model = type(get_model(args.model, pretrained=False)).load_from_checkpoint(args.checkpoint)
        images = args.images

    paths = sorted(p for p in images.rglob("*") if p.suffix.lower() in {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"})
    # batch-1 latency of the torch module (pre-processing, network, post-processing), timed before
    # OpenVINO starts its own CPU threads
    model.eval()
    tensor = read_image(paths[0], as_tensor=True).unsqueeze(0)
    with torch.inference_mode():
        torch_ms = median_ms(lambda: model(tensor), args.repeats)

    # FP32, and INT8 post-training quantization calibrated on the datamodule's training images
    fp32 = Path(engine.export(model, export_type=ExportType.OPENVINO, export_root=out / "fp32"))
    int8 = Path(engine.export(model, export_type=ExportType.OPENVINO, export_root=out / "int8", compression_type=CompressionType.INT8_PTQ, datamodule=datamodule))
    print(f"OpenVINO FP32: {fp32}\nOpenVINO INT8: {int8}")

    # f32 hint: on CPUs with bfloat16 OpenVINO would otherwise run the FP32 model in bfloat16
    inferencers = {name: OpenVINOInferencer(path=path, device="CPU", config={"INFERENCE_PRECISION_HINT": "f32"}) for name, path in (("FP32", fp32), ("INT8", int8))}
    overlays = out / "overlays"
    overlays.mkdir(parents=True, exist_ok=True)
    for path in paths:
        prediction = inferencers["FP32"].predict(path)
        int8_score = float(inferencers["INT8"].predict(path).pred_score.item())
        image = read_image(path, as_tensor=False)
        amap = torch.nn.functional.interpolate(torch.from_numpy(prediction.anomaly_map.squeeze())[None, None], size=image.shape[:2], mode="bilinear")[0, 0]
        score = float(prediction.pred_score.item())
        name = f"{path.parent.name}_{path.stem}"  # good/000.png and scratch/000.png must not overwrite each other
        save_figure(overlays / f"{name}.png", image, np.asarray(amap), None, f"{name}: FP32 {score:.3f}, INT8 {int8_score:.3f}")
        print(f"{name}: score FP32 {score:.3f}  INT8 {int8_score:.3f}  label {bool(prediction.pred_label.item())}")
    print(f"Overlays of {len(paths)} images: {overlays}")

    ov_ms = {name: median_ms(lambda inf=inf: inf.predict(paths[0]), args.repeats) for name, inf in inferencers.items()}
    print(f"Latency (batch 1, median of {args.repeats}): torch {torch_ms:.1f} ms | OpenVINO FP32 {ov_ms['FP32']:.1f} ms | OpenVINO INT8 {ov_ms['INT8']:.1f} ms")


if __name__ == "__main__":
    main()
