"""Base class of the plugin's anomalib modules."""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch

from anomalib import LearningType
from anomalib.data import Batch
from anomalib.models.components import AnomalibModule
from lightning.pytorch import Callback
from lightning.pytorch.utilities.types import STEP_OUTPUT
from torch import nn

from anomalib_mcad.models.components.weights import fetch_hub_weights


#: Key of the plugin's record in a Lightning checkpoint.
CHECKPOINT_KEY = "anomalib_mcad"
#: Checkpoint layout number; raised when a change would make older code misread a checkpoint.
CHECKPOINT_FORMAT = 1

#: ONNX opset of every export of our models (ONNX, and OpenVINO through ONNX). torch's dynamo
#: exporter builds the graph at opset 18; anomalib asks for 14 by default, and onnxscript's
#: down-conversion to 14 then fails and logs a long traceback before keeping 18 anyway.
ONNX_OPSET = 18


#: OpenVINO operation types whose inputs INT8 post-training quantization leaves in FP32: the
#: elementwise arithmetic of residuals, distance maps, upsampling, scores and normalisation.
FP32_OPERATIONS = (
    "Add", "Multiply", "Subtract", "Divide", "Power", "Sqrt", "Interpolate", "ReduceMax", "ReduceMean",
    "ReduceSum", "Clamp", "Minimum", "Maximum", "Sigmoid", "Exp", "Log", "TopK",
)  # fmt: skip
#: NNCF presets by name: "mixed" quantizes activations asymmetrically (NNCF's advice for GELU and
#: LayerNorm activations, as in ViTs), "performance" symmetrically.
INT8_PRESETS = ("mixed", "performance")
#: Calibration images used at most (NNCF's default subset size), evenly spaced over a larger training set.
INT8_CALIBRATION_IMAGES = 300


def calibration_indices(count: int, limit: int = INT8_CALIBRATION_IMAGES) -> list[int]:
    """Which of ``count`` training images calibrate INT8: all of them, or ``limit`` evenly spaced over the set.

    Evenly spaced rather than the first ``limit``: a multi-class training set is ordered by
    category, so its first images may all be of one or two categories (MVTec-AD's first 300 are
    bottles and cables), and INT8 ranges fitted on them miss the others' activations. On the
    synthetic check, MINT-AD calibrated on the first half of a 3-category set (two categories)
    correlated 0.871 with FP32, on every other image (all three) 0.993.
    """
    if count <= limit:
        return list(range(count))
    return [int(i) for i in np.linspace(0, count - 1, limit).round()]


def calibration_dataset(datamodule: Any) -> tuple[Any, int]:  # noqa: ANN401
    """NNCF dataset of the datamodule's training images chosen by :func:`calibration_indices`, and their count.

    Deterministic: the training set in its own order (category, then file name, for our
    datamodule), one image per item, without training augmentations, no shuffling; so an INT8
    export depends on the training images only, never on a random draw or the batch size.
    """
    import copy  # noqa: PLC0415

    import nncf  # noqa: PLC0415
    from torch.utils.data import DataLoader, Subset  # noqa: PLC0415

    datamodule.setup("fit")
    data = copy.copy(datamodule.train_data)
    if hasattr(data, "augmentations"):
        data.augmentations = None
    chosen = calibration_indices(len(data))
    loader = DataLoader(Subset(data, chosen), batch_size=1, shuffle=False, num_workers=0, collate_fn=data.collate_fn)
    return nncf.Dataset(loader, lambda batch: batch.image.numpy()), len(chosen)


def _rng_states() -> dict[str, Any]:
    """Lightning's collection of the torch, CUDA, NumPy and Python RNG states, in plain types."""
    from lightning.fabric.utilities.seed import _collect_rng_states  # noqa: PLC0415

    states = _collect_rng_states(include_cuda=torch.cuda.is_available())
    kind, keys, pos, has_gauss, cached = states["numpy"]
    states["numpy"] = (kind, torch.from_numpy(np.asarray(keys, dtype=np.int64)), int(pos), int(has_gauss), float(cached))
    return states


def _restore_rng_states(states: dict[str, Any]) -> None:
    """Inverse of :func:`_rng_states`."""
    from lightning.fabric.utilities.seed import _set_rng_states  # noqa: PLC0415

    states = dict(states)
    kind, keys, pos, has_gauss, cached = states["numpy"]
    states["numpy"] = (kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached)
    if not torch.cuda.is_available():
        states.pop("torch.cuda", None)
    _set_rng_states(states)


class CheckpointMismatchError(ValueError):
    """A checkpoint that does not belong to the model it is being loaded into."""


def _plain(value: Any) -> Any:  # noqa: ANN401
    """``value`` with paths turned into strings, so the checkpoint loads with ``weights_only=True``."""
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_plain(v) for v in value)
    return value


def map_smoothing_convolutions(model: Any) -> list[str]:  # noqa: ANN401
    """Names of the OpenVINO model's convolutions from one channel to one channel: anomaly-map smoothing.

    The Gaussian blur of a score map belongs to the FP32 scoring tail. Quantized, it collapsed
    the scores of Dinomaly, INP-Former and PMAD to ~1e-7 (OpenVINO 2026.4, NNCF); feature
    convolutions always have more than one channel on one side.
    """
    names = []
    for op in model.get_ordered_ops():
        if op.get_type_name() != "Convolution":
            continue
        weights = op.input_value(1).get_partial_shape()
        if weights.is_static and weights[0].get_length() == 1 and weights[1].get_length() == 1:
            names.append(op.get_friendly_name())
    return names


#: OpenVINO operations between a distance product and the nearest-neighbour choice it feeds (norms
#: added, the product scaled by -2, clamped at zero, a category's rows masked, and the blocks of
#: :func:`~anomalib_mcad.models.components.coreset.blockwise_min`: padded, reshaped, reduced, gathered).
_DISTANCE_ARITHMETIC = (
    "Add", "Subtract", "Multiply", "Clamp", "Maximum", "Sqrt", "Convert", "Select", "Pad", "Reshape", "ReduceMin",
    "GatherElements", "Squeeze",
)  # fmt: skip
#: How many of those operations may separate the product from its ``TopK``.
_DISTANCE_HOPS = 6
#: The operations INT8 post-training quantization quantizes (the rest is kept FP32 by :data:`FP32_OPERATIONS`).
_HEAVY_OPERATIONS = ("MatMul", "Convolution", "GroupConvolution")


def _consumers(nodes: list[Any]) -> list[Any]:
    """The OpenVINO nodes that read any output of ``nodes``."""
    return [target.get_node() for node in nodes for output in node.outputs() for target in output.get_target_inputs()]


def nearest_neighbour_matmuls(model: Any) -> list[str]:  # noqa: ANN401
    """Names of the OpenVINO model's matrix products with a constant table that feed a nearest-entry search.

    ``x @ table.T`` followed only by norm arithmetic (:data:`_DISTANCE_ARITHMETIC`) and a ``TopK``
    (``argmin``/``topk`` over squared distances): the prototype search of ``CoresetBank`` and a
    tokenizer's codebook search. Their products decide discrete choices (nearest prototype,
    token target, category vote, masked patches); quantized, nearby entries swap and the scores
    jump, so INT8 post-training quantization keeps them in FP32.
    """
    names = []
    for op in model.get_ordered_ops():
        if op.get_type_name() != "MatMul" or not _computed_from_constants(op.input_value(1).get_node()):
            continue
        frontier, found = [op], False
        for _ in range(_DISTANCE_HOPS + 1):
            consumers = _consumers(frontier)
            if any(c.get_type_name() == "TopK" for c in consumers):
                found = True
                break
            frontier = [c for c in consumers if c.get_type_name() in _DISTANCE_ARITHMETIC]
            if not frontier:
                break
        if found:
            names.append(op.get_friendly_name())
    return names


def _computed_from_constants(node: Any) -> bool:  # noqa: ANN401
    """True when no graph input reaches ``node``: a constant, or a table padded or transposed from constants."""
    return not any(op.get_type_name() == "Parameter" for op in _input_cone(node).values())


def _input_cone(node: Any) -> dict[str, Any]:  # noqa: ANN401
    """``node`` and every operation it is computed from (constants excluded), by name."""
    cone = {node.get_friendly_name(): node}
    frontier = [node]
    while frontier:
        sources = [value.get_node() for item in frontier for value in item.input_values()]
        frontier = list({s.get_friendly_name(): s for s in sources if s.get_type_name() != "Constant" and s.get_friendly_name() not in cone}.values())
        cone.update((s.get_friendly_name(), s) for s in frontier)
    return cone


def search_operations(model: Any, after: bool = False) -> list[str]:  # noqa: ANN401
    """Names of the operations around each nearest-entry search whose result feeds later products.

    A :func:`nearest_neighbour_matmuls` search counts when its result (its ``TopK``) flows into
    further matrix products or convolutions before the next ``TopK`` (the one-channel
    convolutions that smooth a score map, :func:`map_smoothing_convolutions`, do not count).
    Returned: every operation its query is computed from (the feature network: its INT8 error
    moves each query, and with it the nearest entry and the residual to it), and with ``after``
    every operation from the result up to that next ``TopK``. For MaskAD the query side is the
    CNN (the reconstructing ViT after the search stays INT8); for PMAD, with ``after``, the whole
    ProtoFlow: CNN, feature pooling, residual to the nearest prototype and the flow, whose
    likelihood ranking picks the masked patches and whose couplings exponentiate their inputs.
    A search whose result is only gathered (a tokenizer's code) is left out, and so is the
    network computing its query.
    """
    searches = set(nearest_neighbour_matmuls(model))
    smoothing = set(map_smoothing_convolutions(model))
    names: set[str] = set()
    for op in model.get_ordered_ops():
        if op.get_friendly_name() not in searches:
            continue
        starts, frontier = [], [op]
        while frontier:  # the norm arithmetic up to the TopK
            consumers = _consumers(frontier)
            starts += [c for c in consumers if c.get_type_name() == "TopK"]
            frontier = [c for c in consumers if c.get_type_name() in _DISTANCE_ARITHMETIC]
        downstream: dict[str, str] = {}
        frontier = starts
        while frontier:
            consumers = _consumers(frontier)
            frontier = []
            for node in consumers:
                name = node.get_friendly_name()
                if name in downstream or node.get_type_name() == "TopK":
                    continue
                downstream[name] = node.get_type_name()
                frontier.append(node)
        if any(kind in _HEAVY_OPERATIONS and name not in smoothing for name, kind in downstream.items()):
            names |= _input_cone(op.input_value(0).get_node()).keys()
            if after:
                names |= downstream.keys()
    return sorted(names)


#: anomalib's ``PostProcessor`` statistics (NaN until fitted) and the switches under which its graph uses them.
_NORMALISATION_STATISTICS = ("image_min", "image_max", "pixel_min", "pixel_max", "_image_threshold", "_pixel_threshold")
_THRESHOLDS = ("_image_threshold", "_pixel_threshold")


def _unfitted_statistics(post_processor: Any) -> list[str]:  # noqa: ANN401
    """Names of the post-processor's floating buffers that its exported graph uses and that hold NaN or Inf.

    anomalib's statistics start as NaN and are filled by validation; those a disabled switch
    (``enable_normalization``, ``enable_thresholding``) leaves out of the graph are not counted.
    Buffers of other post-processors are all counted.
    """
    if not isinstance(post_processor, torch.nn.Module):
        return []
    used: set[str] = set()
    if getattr(post_processor, "enable_normalization", True):
        used.update(_NORMALISATION_STATISTICS)
    if getattr(post_processor, "enable_thresholding", True):
        used.update(_THRESHOLDS)
    return [
        name
        for name, buffer in post_processor.named_buffers()
        if (name in used or name not in _NORMALISATION_STATISTICS)
        and buffer.is_floating_point()
        and not bool(torch.isfinite(buffer).all())
    ]


class McadModule(AnomalibModule):
    """An :class:`~anomalib.models.components.AnomalibModule` with the plugin's shared behaviour.

    * anomalib's ``get_model("dinomaly")`` searches the *direct* subclasses of ``AnomalibModule``
      by class name. Our models derive from this intermediate class instead, so importing the
      plugin never changes which class anomalib's lookup returns (it only lists
      ``mcad_module``, which is abstract).
    * ``test`` prints and saves the per-category table
      (:class:`~anomalib_mcad.metrics.PerCategoryMetrics`) unless ``per_category_metrics=False``.
    * Checkpoints record the plugin version, a checkpoint format number and the model class
      under ``checkpoint["anomalib_mcad"]``, and hold only plain types (they load with
      ``torch.load(weights_only=True)``). Loading a checkpoint of another model, or of a newer
      format, is a :class:`CheckpointMismatchError` that says what the file holds.
    * OpenVINO INT8 post-training quantization (anomalib's ``compression_type=int8_ptq``) is
      calibrated on *training* images (anomalib's own uses the validation set, a copy of the
      test set with its default datamodules), in a fixed order (:func:`calibration_dataset`), and
      quantizes only the heavy operations (convolutions, matrix products); the elementwise
      scoring arithmetic stays FP32 (:data:`FP32_OPERATIONS`, the one-channel convolutions that
      smooth score maps, and the distance products of nearest-entry searches:
      :func:`nearest_neighbour_matmuls`), without which small reconstruction differences drown
      in quantization noise; so does the feature network computing the query of a search whose
      result feeds later products, and with ``int8_fp32_after_search`` what that result feeds
      (:func:`search_operations`). NNCF's preset is the class attribute ``int8_preset``.
    * What every model of ours does alike: validation scores the images alone (no labels),
      trainer arguments (gradient clipping from the ``gradient_clip_val`` hyperparameter, no
      sanity validation; the training length is the user's) and the one-class learning type.
    """

    per_category_metrics: bool = True
    #: NNCF preset of INT8 post-training quantization (one of :data:`INT8_PRESETS`); a model sets
    #: the one under which its INT8 scores track FP32 best (README, "Memory and throughput").
    int8_preset: str = "mixed"
    #: Also keep what a nearest-entry search's result flows into in FP32 under INT8 (:func:`search_operations`).
    int8_fp32_after_search: bool = False

    def configure_callbacks(self) -> list[Callback]:
        """anomalib's components, preceded by the per-category table at the end of ``test``.

        Placed before the post-processor so the table is computed on raw (unclipped) scores.
        """
        callbacks = list(super().configure_callbacks())
        if self.per_category_metrics:
            from anomalib_mcad.metrics import PerCategoryMetrics  # noqa: PLC0415

            callbacks.insert(0, PerCategoryMetrics())
        return callbacks

    @property
    def scoring_network(self) -> nn.Module:
        """The torch model that scores images (models built lazily override this to name a missing build)."""
        return self.model

    def validation_step(self, batch: Batch, *args: Any, **kwargs: Any) -> STEP_OUTPUT:  # noqa: ANN401
        """Score the batch from the images alone: image scores and anomaly maps."""
        del args, kwargs
        predictions = self.scoring_network(batch.image)
        return batch.update(pred_score=predictions.pred_score, anomaly_map=predictions.anomaly_map)

    def to_onnx(self, export_root: Any, model_file_name: str = "model", input_size: tuple[int, int] | None = None, **kwargs: Any) -> Any:  # noqa: ANN401
        """anomalib's ONNX export at :data:`ONNX_OPSET` unless ``opset_version`` is given (OpenVINO export goes through it).

        Pending hub weights are fetched first, outside the traced forward.
        """
        fetch_hub_weights(self)
        kwargs.setdefault("opset_version", ONNX_OPSET)
        return super().to_onnx(export_root, model_file_name, input_size, **kwargs)

    def to_torch(self, *args: Any, **kwargs: Any) -> Any:  # noqa: ANN401
        """anomalib's torch export, with pending hub weights fetched first (the saved model needs no network)."""
        fetch_hub_weights(self)
        return super().to_torch(*args, **kwargs)

    def on_fit_start(self) -> None:
        """Fetch pending hub weights before training, so a failed download stops the run at once.

        Lightning calls this after it restored a checkpoint (``fit(ckpt_path=...)``), whose weights
        already replaced the pending ones: a resumed run needs no network.
        """
        super().on_fit_start()
        fetch_hub_weights(self)

    @property
    def trainer_arguments(self) -> dict[str, Any]:
        """Gradient clipping as the authors (``gradient_clip_val`` hyperparameter); no sanity validation."""
        return {"gradient_clip_val": self.hparams.get("gradient_clip_val"), "num_sanity_val_steps": 0}

    @property
    def learning_type(self) -> LearningType:
        """Unsupervised (one-class): trained on normal images only; category labels are not anomaly labels."""
        return LearningType.ONE_CLASS

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Record version, format and class; keep the hyperparameters loadable with ``weights_only``."""
        super().on_save_checkpoint(checkpoint)
        from anomalib_mcad import __version__  # noqa: PLC0415

        if "hyper_parameters" in checkpoint:
            checkpoint["hyper_parameters"] = _plain(dict(checkpoint["hyper_parameters"]))
        checkpoint[CHECKPOINT_KEY] = {
            "version": __version__,
            "format": CHECKPOINT_FORMAT,
            "model": f"{type(self).__module__}.{type(self).__qualname__}",
            "config": _plain(dict(self.hparams)),
            "rng": _rng_states(),
            "generators": {name: gen.get_state() for name, gen in self._private_generators().items()},
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse a checkpoint of another model or of a newer format, naming what it holds."""
        super().on_load_checkpoint(checkpoint)
        record = checkpoint.get(CHECKPOINT_KEY)
        name = type(self).__name__
        self._resume_rng_states = None if record is None else record.get("rng")
        self._resume_generator_states = None if record is None else record.get("generators")
        if record is not None:
            written_by = str(record.get("model", "?"))
            if written_by.rsplit(".", 1)[-1] != name:
                msg = (
                    f"This checkpoint holds {written_by} (anomalib_mcad {record.get('version', '?')}); "
                    f"it cannot be loaded into {type(self).__module__}.{name}. Load it with that class."
                )
                raise CheckpointMismatchError(msg)
            if int(record.get("format", 0)) > CHECKPOINT_FORMAT:
                msg = (
                    f"This checkpoint was written by anomalib_mcad {record.get('version', '?')} in checkpoint format "
                    f"{record.get('format')}; this installation reads format {CHECKPOINT_FORMAT} or older. Upgrade anomalib_mcad."
                )
                raise CheckpointMismatchError(msg)
            return
        # No record: a checkpoint of an earlier plugin version, or of another library's model.
        network = getattr(self, "model", None)
        state = checkpoint.get("state_dict", {})
        if network is None or not state:
            return
        ours = {f"model.{k}": v.shape for k, v in network.state_dict().items()}
        theirs = {k: getattr(v, "shape", None) for k, v in state.items() if k.startswith("model.")}
        missing, unexpected = sorted(ours.keys() - theirs.keys()), sorted(theirs.keys() - ours.keys())
        resized = sorted(k for k in ours.keys() & theirs.keys() if theirs[k] is not None and tuple(theirs[k]) != tuple(ours[k]))
        if missing or unexpected or resized:
            msg = (
                f"This checkpoint was not written by anomalib_mcad's {name} (it has no '{CHECKPOINT_KEY}' record) and its "
                f"weights do not fit: {len(missing)} missing (e.g. {missing[:2]}), {len(unexpected)} unexpected "
                f"(e.g. {unexpected[:2]}), {len(resized)} of another shape (e.g. {resized[:2]}). Is it a checkpoint of "
                f"another model (such as anomalib's own {name}) or of other constructor arguments?"
            )
            raise CheckpointMismatchError(msg)

    def _post_training_quantization_ov(self, model: Any, datamodule: Any = None) -> Any:  # noqa: ANN401
        """INT8 post-training quantization calibrated on training images; scoring arithmetic kept FP32.

        Replaces anomalib's version (same name and arguments, so ``Engine.export(...,
        compression_type=CompressionType.INT8_PTQ, datamodule=...)`` and the CLI's
        ``--compression_type int8_ptq`` use it).
        """
        import nncf  # noqa: PLC0415
        from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters  # noqa: PLC0415

        if datamodule is None:
            msg = "INT8 post-training quantization needs a datamodule: its training images calibrate the model"
            raise ValueError(msg)
        unfitted = _unfitted_statistics(self.post_processor)
        if unfitted:
            # A NaN statistic becomes a NaN constant of the graph; OpenVINO's low-precision
            # transformation folds it into the final Clamp and the INT8 model fails to compile.
            msg = (
                "INT8 post-training quantization: the post-processor's statistics are not fitted "
                f"(non-finite: {', '.join(unfitted)}). Fit the model first (Engine.fit or Engine.validate "
                "fills them), or build the model with post_processor=False to export raw scores."
            )
            raise ValueError(msg)
        dataset, size = calibration_dataset(datamodule)
        if size == 0:
            msg = "INT8 post-training quantization: the datamodule has no training images to calibrate on"
            raise ValueError(msg)
        fp32_names = map_smoothing_convolutions(model) + nearest_neighbour_matmuls(model)
        fp32_names += search_operations(model, after=self.int8_fp32_after_search)
        ignored = nncf.IgnoredScope(names=fp32_names, types=list(FP32_OPERATIONS), validate=False)
        if self.int8_preset not in INT8_PRESETS:
            msg = f"int8_preset must be one of {INT8_PRESETS}, got {self.int8_preset!r}"
            raise ValueError(msg)
        preset = nncf.QuantizationPreset(self.int8_preset)  # INT8_PRESETS are its values
        # NNCF's (fast) bias correction failed intermittently on these graphs ("cannot reshape array of
        # size 1024 into shape (1,16,3)" inside _set_const_value, NNCF 3.4); the FP32 scoring tail makes
        # it unnecessary for the accuracy the INT8 test asks for.
        advanced = AdvancedQuantizationParameters(disable_bias_correction=True)
        return nncf.quantize(model, dataset, preset=preset, subset_size=size, ignored_scope=ignored, advanced_parameters=advanced)

    def setup(self, stage: str | None = None) -> None:
        """Under DDP, let models with several backward passes per step leave parameters unused.

        A manually optimised model (PMAD: one backward for its masked image model, one for its
        flow, and a flow frozen after its epochs) leaves some parameters without gradient in a
        backward; DDP then needs ``find_unused_parameters=True``. Lightning builds the DDP wrapper
        after this hook from the strategy's keyword arguments, so ``strategy="ddp"`` works for
        every model; an explicit ``find_unused_parameters`` of the user's is kept.
        """
        super().setup(stage)
        strategy = getattr(self.trainer, "strategy", None) if self._trainer is not None else None
        # DDPStrategy keeps the keyword arguments it gives DistributedDataParallel here (Lightning 2.x)
        ddp_kwargs = getattr(strategy, "_ddp_kwargs", None)
        if stage == "fit" and not self.automatic_optimization and isinstance(ddp_kwargs, dict):
            ddp_kwargs.setdefault("find_unused_parameters", True)

    def on_train_start(self) -> None:
        """When training resumes from a checkpoint, continue its random streams (shuffling, dropout, noise).

        Lightning restores weights, optimizer and loop state but not the RNGs; without them a
        resumed run draws other batches and noise than the uninterrupted one. Applied here, after
        the restore and before the first training batch, never on a plain ``load_from_checkpoint``.
        """
        super().on_train_start()
        states = getattr(self, "_resume_rng_states", None)
        generators = getattr(self, "_resume_generator_states", None) or {}
        if states is not None and self._trainer is not None and self.trainer.ckpt_path:
            _restore_rng_states(states)
            own = self._private_generators()
            for name, state in generators.items():
                if name in own:
                    own[name].set_state(state)
        self._resume_rng_states = None
        self._resume_generator_states = None

    def _private_generators(self) -> dict[str, torch.Generator]:
        """The module's own random streams (``torch.Generator`` attributes, e.g. mask samplers), by name.

        They are separate from the global RNG, so a resumed run must restore them too.
        """
        return {name: value for name, value in vars(self).items() if isinstance(value, torch.Generator)}
