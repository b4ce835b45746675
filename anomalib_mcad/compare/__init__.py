"""Side-by-side comparison of anomaly-detection models: one call, one report folder.

Python::

    from anomalib_mcad.compare import compare
    result = compare(
        models=[
            {"class_path": "anomalib_mcad.MintAd", "init_args": {"pretrained": False}},
            {"class_path": "anomalib.models.Patchcore", "init_args": {"backbone": "resnet18", "pre_trained": False}},
        ],
        data={"class_path": "anomalib_mcad.data.MultiClassDataModule", "init_args": {"root": "datasets/synthetic"}},
        output_dir="compare_report",
        trainer={"max_steps": 100},
    )

Command line: ``anomalib-mcad compare --config configs/compare/synthetic_cpu.yaml``.
See :mod:`anomalib_mcad.compare.config` for the YAML format and ``README.md`` here for the report.
"""

from __future__ import annotations

import datetime
import logging
import platform
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from anomalib_mcad.compare.config import CompareSettings, ModelSpec, load_settings
from anomalib_mcad.compare.offline import DownloadBlockedError, block_downloads, random_backbone_weights
from anomalib_mcad.compare.runner import ModelResult, ProbeImages

__all__ = [
    "CompareResult",
    "CompareSettings",
    "DownloadBlockedError",
    "ModelResult",
    "ModelSpec",
    "block_downloads",
    "compare",
    "load_settings",
    "main",
    "random_backbone_weights",
]


@dataclass
class CompareResult:
    """The models' results and the report's files."""

    results: list[ModelResult]
    paths: dict[str, Path] = field(default_factory=dict)
    header: dict[str, Any] = field(default_factory=dict)
    elapsed_s: float = 0.0


def _versions() -> str:
    from importlib.metadata import PackageNotFoundError, version  # noqa: PLC0415

    parts = []
    for package in ("torch", "openvino", "anomalib", "lightning", "timm", "anomalib-mcad"):
        try:
            parts.append(f"{package} {version(package)}")
        except PackageNotFoundError:
            parts.append(f"{package} (not installed)")
    return ", ".join(parts)


def _load_average() -> str:
    """1/5/15-minute load averages and the core count: timings mean little on a busy machine."""
    import os  # noqa: PLC0415

    if not hasattr(os, "getloadavg"):
        return "n/a"
    one, five, fifteen = os.getloadavg()
    return f"{one:.1f} / {five:.1f} / {fifteen:.1f} (1/5/15 min) on {os.cpu_count()} cores"


def _summary_line(index: int, total: int, r: ModelResult) -> str:
    if not r.ok:
        return f"[{index}/{total}] {r.label}: FAILED ({r.error})"
    ov = f"{r.latency_openvino_ms:.1f} ms" if r.latency_openvino_ms is not None else "n/a"
    torch_ms = f"{r.latency_torch_ms:.1f} ms" if r.latency_torch_ms is not None else "n/a"  # medians
    return (
        f"[{index}/{total}] {r.label}: image AUROC {100 * r.mean('image_AUROC'):.2f}, pixel AUROC {100 * r.mean('pixel_AUROC'):.2f}, "
        f"AUPRO {100 * r.mean('pixel_AUPRO'):.2f} | train {r.train_time_s:.1f} s | latency torch {torch_ms}, OpenVINO {ov}"
    )


def compare(
    models: Sequence[ModelSpec | Mapping[str, Any] | str],
    data: Mapping[str, Any] | Any,  # noqa: ANN401
    settings: CompareSettings | None = None,
    **overrides: Any,  # noqa: ANN401
) -> CompareResult:
    """Train and test every model on the same data with the same seed; write the report folder.

    Args:
        models: class paths, or ``{class_path, init_args, name, trainer, random_weights}`` entries
            (:class:`ModelSpec`).
        data: the datamodule as ``{class_path, init_args}`` (a fresh one is built for each model),
            or an instance (shared by all models).
        settings: output folder, seed, offline mode, trainer arguments, ... (:class:`CompareSettings`).
        **overrides: fields of :class:`CompareSettings` (``output_dir="report"``, ``trainer={...}``).

    Returns:
        Every model's :class:`ModelResult` (failed ones with their error) and the report's paths.
    """
    from tqdm.auto import tqdm  # noqa: PLC0415

    from anomalib_mcad.compare import report, runner  # noqa: PLC0415

    settings = replace(settings or CompareSettings(), **overrides)
    settings.output_dir = Path(settings.output_dir)
    specs = runner.as_specs(models)
    # The validation sets hold normal images only: anomalib's F1 threshold then warns at every
    # validation that it falls back to the highest normal score. That is expected here.
    logging.getLogger("anomalib.metrics.threshold.f1_adaptive_threshold").setLevel(logging.ERROR)
    started = time.perf_counter()

    with runner.build_guards(settings.offline, random_weights=False):
        probe_dm = runner.make_datamodule(data)
        probe: ProbeImages | None = runner.select_probe_images(probe_dm, settings.figure_images)
    categories = list(dict.fromkeys(probe_dm.test_data.samples["category"])) if "category" in probe_dm.test_data.samples else [str(getattr(probe_dm, "category", "all"))]
    data_name = data.get("class_path") if isinstance(data, Mapping) else type(data).__name__
    header = {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "device": runner.device_description(),
        "versions": f"{_versions()}, python {platform.python_version()}",
        "seed": settings.seed,
        "offline": settings.offline,
        "data": f"{data_name}: {len(probe_dm.train_data)} train / {len(probe_dm.test_data)} test images, categories {categories}",
        "trainer": settings.trainer or "{}",
        "pixel metrics at": f"{settings.eval_size}x{settings.eval_size}" if settings.eval_size else "prediction resolution",
        "latency input": "x".join(map(str, probe.image.shape[-2:])) + " (one test image, batch 1)",
        "load average at start": _load_average(),
    }
    del probe_dm

    results: list[ModelResult] = []
    bar = tqdm(specs, desc="models", unit="model", position=0)
    for index, spec in enumerate(bar, start=1):
        bar.set_postfix_str(spec.label)
        folder = runner.model_dir(settings.output_dir, index, spec)
        if spec.per_category:
            result = runner.run_per_category(spec, data, settings, folder, probe, categories)
        else:
            result = runner.run_model(spec, data, settings, folder, probe)
        results.append(result)
        tqdm.write(_summary_line(index, len(specs), result))
        if index < len(specs):  # a report after every model: an interrupted run keeps what it finished
            progress = {**header, "status": f"in progress: {index} of {len(specs)} models done"}
            report.write_report(settings.output_dir, progress, results, probe)
    bar.close()

    devices = sorted({r.device for r in results if r.device})
    if devices:
        header["device"] += f"; models ran on {', '.join(devices)}"
    elapsed = time.perf_counter() - started
    header["total time"] = f"{elapsed / 60:.1f} min"
    header["load average at end"] = _load_average()
    paths = report.write_report(settings.output_dir, header, results, probe)
    print(f"Report: {paths['markdown']} ({sum(r.ok for r in results)}/{len(results)} models succeeded, {elapsed / 60:.1f} min)")  # noqa: T201
    return CompareResult(results=results, paths=paths, header=header, elapsed_s=elapsed)


def main(argv: Sequence[str] | None = None) -> int:
    """``anomalib-mcad compare``: parse the YAML/arguments and run :func:`compare`.

    Exit status 0 when the report was written and at least one model succeeded (failed models
    are listed in it), 1 when every model failed.
    """
    import sys  # noqa: PLC0415

    models, data, settings = load_settings(list(sys.argv[1:] if argv is None else argv))
    result = compare(models, data, settings)
    return 0 if any(r.ok for r in result.results) else 1
