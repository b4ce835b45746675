"""Train and test each model of a comparison with anomalib's Engine; measure its costs.

Every model gets the same seed (``seed_everything`` before it is built), a datamodule built from
the same configuration, the same trainer arguments and the same per-category evaluation
(:class:`~anomalib_mcad.metrics.PerCategoryMetrics` given to the Engine, so it runs before the
model's own post-processor and sees raw scores, for our models and anomalib's alike; the copy
our models add themselves is switched off so it is computed once). A model that fails at any
stage before its metrics exist is reported as failed with its error; later stages (FLOPs,
export, OpenVINO timing) that fail leave ``n/a`` with the reason.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import time
import traceback
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F  # noqa: N812

from anomalib_mcad.compare.config import CompareSettings, ModelSpec, instantiate, slug
from anomalib_mcad.compare.offline import block_downloads, random_backbone_weights
from anomalib_mcad.models.components.base import ONNX_OPSET
from anomalib_mcad.compare.profiling import (
    PeakMemory,
    count_flops,
    count_parameters,
    openvino_latency_ms,
    torch_latency_ms,
)

logger = logging.getLogger(__name__)

__all__ = ["ModelResult", "ProbeImages", "run_model", "select_probe_images"]


@dataclass
class ProbeImages:
    """Test images shared by all models: one for FLOPs/latency, a few for the anomaly-map grid."""

    image: torch.Tensor  # (3, H, W), as the datamodule yields it
    grid_images: torch.Tensor  # (N, 3, H, W)
    grid_masks: torch.Tensor | None  # (N, H, W) bool
    grid_titles: list[str]


@dataclass
class ModelResult:
    """What one model of the comparison produced; ``status`` is ``"ok"`` or ``"failed"``."""

    label: str
    class_path: str
    status: str = "failed"
    error: str | None = None
    stage: str = "build"
    metrics: pd.DataFrame | None = None  # PerCategoryMetrics table, fractions
    score_source: str | None = None
    params_total: int | None = None
    params_trainable: int | None = None
    flops: int | None = None
    flops_note: str | None = None
    train_time_s: float | None = None
    train_steps: int | None = None  # optimizer steps actually run (a model's trainer_arguments can override ours)
    test_time_s: float | None = None
    device: str | None = None
    input_size: tuple[int, int] | None = None
    latency_torch_ms: float | None = None  # median
    latency_torch_min_ms: float | None = None
    latency_openvino_ms: float | None = None  # median
    latency_openvino_min_ms: float | None = None
    openvino_note: str | None = None
    peak_rss_train_mb: float | None = None
    peak_rss_test_mb: float | None = None
    peak_cuda_mb: float | None = None
    grid_maps: np.ndarray | None = None  # (N, H, W) normalised maps of the probe images
    grid_scores: list[float] = field(default_factory=list)
    output_dir: Path | None = None

    @property
    def ok(self) -> bool:
        """Whether the model trained and was tested."""
        return self.status == "ok"

    def mean(self, column: str) -> float:
        """Mean-over-categories value of a metric (fraction; NaN if failed or unknown)."""
        if self.metrics is None:
            return float("nan")
        row = self.metrics[self.metrics["category"] == "mean"]
        return float(row.iloc[0][column]) if len(row) else float("nan")


@contextlib.contextmanager
def build_guards(offline: bool, random_weights: bool) -> Iterator[None]:
    """Download blocking (``offline``) and forced random backbones (``random_weights``)."""
    with contextlib.ExitStack() as stack:
        if offline:
            stack.enter_context(block_downloads("offline: true"))
        if random_weights:
            stack.enter_context(random_backbone_weights())
        yield


def make_datamodule(data: Mapping[str, Any] | Any, overrides: Mapping[str, Any] | None = None) -> Any:  # noqa: ANN401
    """A fresh datamodule from its ``class_path``/``init_args`` (an instance is returned as is).

    ``overrides`` replace loader arguments (a model's own batch size); they need the
    configuration form, since an instance is shared by every model.
    """
    from anomalib.data import AnomalibDataModule  # noqa: PLC0415

    if isinstance(data, Mapping):
        init_args = {**dict(data.get("init_args") or {}), **dict(overrides or {})}
        return instantiate(AnomalibDataModule, {**data, "init_args": init_args})
    if overrides:
        msg = f"per-model data arguments {dict(overrides)} need the datamodule as class_path/init_args, not an instance"
        raise ValueError(msg)
    return data


def select_probe_images(datamodule: Any, n_images: int) -> ProbeImages:  # noqa: ANN401
    """Anomalous test images taken in turn from each category and, within one, each defect type; then normal ones.

    Deterministic (path order within a defect type), so every model is shown the same images,
    and varied: a grid of four images over two categories shows two defect types of each.
    """
    if not hasattr(datamodule, "test_data"):
        datamodule.setup()
    dataset = datamodule.test_data
    samples = dataset.samples.reset_index(drop=True)
    samples = samples.assign(_row=np.arange(len(samples))).sort_values("image_path", kind="stable")
    group = "category" if "category" in samples.columns else None
    samples["_cat"] = samples[group].astype(str) if group else ""
    samples["_defect"] = [Path(str(p)).parent.name for p in samples["image_path"]]
    anomalous = samples[samples["label_index"] == 1].copy()
    # k-th image of each defect type, defect types in turn, categories in turn
    anomalous["_k"] = anomalous.groupby(["_cat", "_defect"]).cumcount()
    anomalous = anomalous.sort_values(["_cat", "_k", "_defect"], kind="stable")
    anomalous["_turn"] = anomalous.groupby("_cat").cumcount()
    order = {c: i for i, c in enumerate(dict.fromkeys(samples["_cat"]))}
    anomalous = anomalous.assign(_c=anomalous["_cat"].map(order)).sort_values(["_turn", "_c"], kind="stable")
    normal = samples[samples["label_index"] == 0]
    rows = list(pd.concat([anomalous, normal])["_row"][: max(1, n_images)])
    items = [dataset[int(i)] for i in rows]
    images = torch.stack([torch.as_tensor(item.image) for item in items])
    masks = None
    if all(item.gt_mask is not None for item in items):
        masks = torch.stack([torch.as_tensor(item.gt_mask).reshape(images.shape[-2:]) > 0.5 for item in items])
    titles = []
    for i in rows:
        row = samples.loc[samples["_row"] == i].iloc[0]
        category = f"{row['category']}/" if group else ""
        titles.append(f"{category}{Path(str(row['image_path'])).parent.name}/{Path(str(row['image_path'])).stem}")
    return ProbeImages(image=torch.as_tensor(items[0].image), grid_images=images, grid_masks=masks, grid_titles=titles)


def _anomaly_maps(model: torch.nn.Module, images: torch.Tensor) -> tuple[np.ndarray, list[float]]:
    """The model's (post-processed) anomaly maps of ``images`` at the images' size, and image scores."""
    model.eval()
    device = next(iter(model.parameters()), torch.empty(0)).device
    with torch.inference_mode():
        out = model(images.to(device))
    amap = torch.as_tensor(out.anomaly_map).float()
    amap = amap.reshape(images.shape[0], 1, *amap.shape[-2:])
    amap = F.interpolate(amap, size=images.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    scores = torch.as_tensor(out.pred_score).reshape(-1).float().tolist() if out.pred_score is not None else []
    return amap.cpu().numpy(), scores


def _error_text(exc: BaseException, limit: int = 400) -> str:
    """``Type: message`` on one line, shortened to ``limit`` characters (the full traceback goes to a file)."""
    text = " ".join(line.strip() for line in str(exc).strip().splitlines() if line.strip())
    text = f"{type(exc).__name__}: {text}".strip()
    return text if len(text) <= limit else text[: limit - 3] + "..."


def run_model(
    spec: ModelSpec,
    data: Mapping[str, Any] | Any,  # noqa: ANN401
    settings: CompareSettings,
    output_dir: Path,
    probe: ProbeImages | None,
) -> ModelResult:
    """Build, train, test and measure one model; never raises (errors go into the result)."""
    from anomalib.deploy import ExportType  # noqa: PLC0415
    from anomalib.engine import Engine  # noqa: PLC0415
    from anomalib.models import AnomalibModule  # noqa: PLC0415
    from lightning.pytorch import seed_everything  # noqa: PLC0415

    from anomalib_mcad.metrics import PerCategoryMetrics  # noqa: PLC0415

    result = ModelResult(label=spec.label, class_path=spec.class_path, output_dir=output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    model = engine = None
    try:
        with build_guards(settings.offline, spec.random_weights):
            seed_everything(settings.seed, workers=True)
            model = instantiate(AnomalibModule, {"class_path": spec.class_path, "init_args": spec.init_args})
            if spec.backbone_weights:
                from anomalib_mcad.compare.backbones import load_builtin_backbone  # noqa: PLC0415

                load_builtin_backbone(model, spec.backbone_weights)
            if hasattr(model, "per_category_metrics"):
                model.per_category_metrics = False  # computed once, by the Engine's callback below
            if not settings.save_images and "visualizer" not in spec.init_args:
                model.visualizer = None  # one PNG per test image and model: slow, and the report has its own grid
            if not settings.anomalib_evaluator and "evaluator" not in spec.init_args:
                model.evaluator = None  # a second metric set at every validation and test; the report uses PerCategoryMetrics
            result.stage = "data"
            datamodule = make_datamodule(data, spec.data)
            metrics = PerCategoryMetrics(eval_size=settings.eval_size, output_dir=output_dir, print_table=False)
            trainer_args: dict[str, Any] = {"accelerator": "auto", "devices": 1, "logger": False, **settings.trainer, **spec.trainer}
            callbacks = [metrics, *trainer_args.pop("callbacks", [])]
            trainer_args.setdefault("default_root_dir", output_dir / "run")
            engine = Engine(callbacks=callbacks, **trainer_args)

            result.stage = "fit"
            # again before training: building the model drew a model-dependent amount of random
            # numbers, and a datamodule that shuffles with the global generator must not see that
            seed_everything(settings.seed, workers=True)
            with PeakMemory() as memory:
                start = time.perf_counter()
                engine.fit(model=model, datamodule=datamodule)
                result.train_time_s = time.perf_counter() - start
                result.train_steps = int(engine.trainer.global_step)
            result.peak_rss_train_mb = memory.peak_rss_mb
            result.params_total, result.params_trainable = count_parameters(model, engine.trainer.optimizers)

            result.stage = "test"
            with PeakMemory() as memory:
                start = time.perf_counter()
                engine.test(model=model, datamodule=datamodule)
                result.test_time_s = time.perf_counter() - start
                if metrics.results is None:
                    msg = "the test loop produced no predictions (empty test set?)"
                    raise RuntimeError(msg)
                result.metrics = metrics.results.copy()
                result.score_source = metrics.score_source
                result.status = "ok"
                device = next(iter(model.parameters()), torch.empty(0)).device
                result.device = str(device)
                if probe is not None:
                    image = probe.image[None].to(device)
                    result.input_size = (int(image.shape[-2]), int(image.shape[-1]))
                    result.stage = "latency"
                    result.latency_torch_ms, result.latency_torch_min_ms = torch_latency_ms(model, image, settings.latency_warmup, settings.latency_runs)
                    result.stage = "figures"
                    result.grid_maps, result.grid_scores = _anomaly_maps(model, probe.grid_images)
            result.peak_rss_test_mb = memory.peak_rss_mb
            if memory.peak_cuda_bytes is not None:
                result.peak_cuda_mb = memory.peak_cuda_bytes / 2**20

            if probe is not None:
                result.stage = "flops"
                try:
                    result.flops = count_flops(model, probe.image[None].to(device))
                except Exception as exc:  # noqa: BLE001  (reported, not fatal)
                    result.flops_note = _error_text(exc)
                if settings.openvino:
                    result.stage = "openvino"
                    try:
                        model.cpu()
                        # opset 18 for anomalib's built-in models too (ours default to it): no failed down-conversion traceback
                        xml = engine.export(model=model, export_type=ExportType.OPENVINO, export_root=output_dir / "export", input_size=result.input_size, onnx_kwargs={"opset_version": ONNX_OPSET})
                        ov_image = probe.image[None].numpy().astype(np.float32)
                        result.latency_openvino_ms, result.latency_openvino_min_ms = openvino_latency_ms(xml, ov_image, settings.latency_warmup, settings.latency_runs)
                    except Exception as exc:  # noqa: BLE001  (reported, not fatal)
                        result.openvino_note = _error_text(exc)
                        (output_dir / "openvino_error.txt").write_text(traceback.format_exc())
                else:
                    result.openvino_note = "not measured (openvino: false)"
            result.stage = "done"
    except Exception as exc:  # noqa: BLE001  (one model's failure must not stop the others)
        if result.status != "ok":
            result.error = f"{result.stage}: {_error_text(exc)}"
        else:  # metrics exist; a later measurement failed
            result.openvino_note = result.openvino_note or f"{result.stage}: {_error_text(exc)}"
        (output_dir / "error.txt").write_text(traceback.format_exc())
    finally:
        del model, engine
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return result


def run_per_category(
    spec: ModelSpec,
    data: Mapping[str, Any] | Any,  # noqa: ANN401
    settings: CompareSettings,
    output_dir: Path,
    probe: ProbeImages | None,
    categories: Sequence[str],
) -> ModelResult:
    """``spec`` trained once per category (``per_category: true``), merged into one result.

    Each category's model sees only that category's training and test images (the datamodule's
    ``categories`` set to it); the table stacks their rows under one mean, training times add up,
    latency and FLOPs are the last model's (same architecture), and each figure image gets the map
    of its own category's model. A failure of any category fails the row, naming the category.
    """
    result = ModelResult(label=spec.label, class_path=spec.class_path, output_dir=output_dir)
    if not isinstance(data, Mapping):
        result.error = "per_category needs the datamodule as class_path/init_args (one is built per category)"
        return result
    from anomalib_mcad.metrics.per_category import with_mean_rows  # noqa: PLC0415

    parts: dict[str, ModelResult] = {}
    for category in categories:
        single = replace(spec, per_category=False, data={**spec.data, "categories": [category]}, name=f"{spec.label} [{category}]")
        part = run_model(single, data, settings, output_dir / slug(category), probe)
        if not part.ok:
            result.stage = part.stage
            result.error = f"category {category}: {part.error}"
            return result
        parts[category] = part
    last = next(reversed(parts.values()))
    merged = replace(last, label=spec.label, class_path=spec.class_path, output_dir=output_dir)
    merged.metrics = with_mean_rows(pd.concat([p.metrics for p in parts.values()], ignore_index=True))
    merged.train_time_s = sum(p.train_time_s or 0.0 for p in parts.values())
    merged.test_time_s = sum(p.test_time_s or 0.0 for p in parts.values())
    merged.train_steps = sum(p.train_steps or 0 for p in parts.values())
    merged.peak_rss_train_mb = max(p.peak_rss_train_mb or 0.0 for p in parts.values())
    if probe is not None and all(p.grid_maps is not None for p in parts.values()):
        owners = [next((c for c in parts if title.startswith(f"{c}/")), None) for title in probe.grid_titles]
        merged.grid_maps = np.stack([parts[c].grid_maps[j] if c else last.grid_maps[j] for j, c in enumerate(owners)])
        merged.grid_scores = [parts[c].grid_scores[j] if c else last.grid_scores[j] for j, c in enumerate(owners)]
    return merged


def device_description() -> str:
    """What ``accelerator: auto`` runs on here: the CUDA device's name, or the CPU and its core count."""
    import os  # noqa: PLC0415
    import platform  # noqa: PLC0415

    if torch.cuda.is_available():
        return f"cuda ({torch.cuda.get_device_name(0)}, {torch.cuda.device_count()} device(s))"
    name = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"cpu ({name}, {cores} cores available, {torch.get_num_threads()} torch threads); no CUDA device found"


def as_specs(models: Sequence[ModelSpec | Mapping[str, Any] | str]) -> list[ModelSpec]:
    """Model specs with unique labels (``#2``, ``#3`` appended to repeated ones)."""
    specs = [ModelSpec.from_config(m) for m in models]
    seen: dict[str, int] = {}
    for spec in specs:
        label = spec.label
        seen[label] = seen.get(label, 0) + 1
        if seen[label] > 1:
            spec.name = f"{label} #{seen[label]}"
    return specs


def model_dir(root: Path, index: int, spec: ModelSpec) -> Path:
    """``models/<nn>_<label>`` under the report folder."""
    return root / "models" / f"{index:02d}_{slug(spec.label)}"
