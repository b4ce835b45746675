"""MaskAD as an anomalib module: masked reconstruction training, then a coreset and flow calibration from training data."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from anomalib.data import Batch
from anomalib.metrics import Evaluator
from anomalib.post_processing import PostProcessor
from anomalib.pre_processing import PreProcessor
from anomalib.visualization import Visualizer
from lightning.pytorch.utilities.types import STEP_OUTPUT, OptimizerLRScheduler

from anomalib_mcad.models.components.validation import NotFittedError
from anomalib_mcad.models.components.base import McadModule
from anomalib_mcad.models.components.distributed import collect_batches, full_training_loader
from anomalib_mcad.models.components.foreground import ForegroundMaskGenerator
from anomalib_mcad.models.components.masking import BlockwiseMaskGenerator, RandomMaskGenerator
from anomalib_mcad.models.components.pre_processing import resize_crop_normalize
from anomalib_mcad.models.components.weights import PretrainedArg
from anomalib_mcad.models.image.mask_ad.loss import MaskAdLoss
from anomalib_mcad.models.image.mask_ad.torch_model import MaskAdModel

TrainStrategy = Literal["random", "block", "foreground"]
TRAIN_STRATEGIES: tuple[str, ...] = ("random", "block", "foreground")


class MaskAd(McadModule):
    """MaskAD (Lu et al., AAAI 2026): parallel masked feature reconstruction scored by an OT discrepancy.

    Training (``training_step``): one masking strategy per iteration (random, block-wise or
    foreground), squared L2 reconstruction of the whole feature map; the ranking flow is trained
    at the same time on the same (detached, frozen-backbone) features, by its own loss on its own
    parameters, so the two do not interact.

    Memory (``fit_memory``): before the first validation/test/predict after training, and before a
    checkpoint is written, one pass over the training dataloader builds the per-category nominal
    coreset (k-center greedy, ``coreset_ratio`` of each category's patches) and calibrates M_po
    (the flow score quantile). The backbone is frozen, so the coreset is built once; the
    calibration is redone whenever the flow has trained since. Both are buffers in the checkpoint.

    Args:
        backbone ... restrict_to_category: see :class:`MaskAdModel`.
        train_strategies: training masking strategies drawn from uniformly, one per iteration.
        train_random_ratio, train_block_ratio: training mask ratios (0.2, 0.15; assumed equal
            to the test ratios, the paper gives none for training).
        foreground_max_ratio: foreground masking masks the Otsu foreground of the feature map
            (``components.foreground``), at most this share of patches (0.5).
        coreset_ratio: share of each category's training patches kept in the coreset (0.1,
            PatchCore's default; not given in the paper).
        calibration_maps: training feature maps kept to calibrate M_po (256).
        lr, weight_decay, betas: AdamW (lr 1e-4 assumed; wd 0.04 from the paper).
        flow_lr: Adam-style rate of the flow (2e-4, CFlow's), no weight decay.
        image_size: inputs are resized to this square size (224).
        normalize_features: per-channel standardisation of the backbone features with training
            statistics (ours; see README).
        feature_resize: ``"bilinear"`` (the authors') or ``"area"`` resizing of the tapped stages
            to the feature grid (see :class:`MaskAdModel`).
    """

    def __init__(
        self,
        backbone: str = "efficientnet_b4",
        pretrained: PretrainedArg = True,
        stages: Sequence[int] = (0, 1, 2, 3),
        feature_size: int = 14,
        embed_dim: int = 768,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        num_encoder_layers: int = 5,
        num_decoder_layers: int = 5,
        n_masks: int = 4,
        random_ratio: float = 0.2,
        block_ratio: float = 0.15,
        prototype_ratio_range: Sequence[float] = (0.01, 0.07),
        empty_mask: bool = True,
        mask_banks: int = 8,
        po_ratio: float = 0.0,
        block_min_patches: int = 4,
        block_min_aspect: float = 0.3,
        mask_seed: int = 0,
        flow_coupling: int = 8,
        flow_clamp: float = 1.9,
        flow_condition_dim: int = 128,
        flow_hidden_ratio: float = 2.0,
        sinkhorn_epsilon: float = 0.1,
        sinkhorn_iterations: int = 100,
        ot_weight: float = 0.6,
        ot_scale: float = 1e4,
        blur_sigma: float = 7.0,
        parallel: bool = True,
        use_po: bool = True,
        use_reference: bool = True,
        use_assdis: bool = True,
        use_rec: bool = True,
        restrict_to_category: bool = False,
        normalize_features: bool = True,
        feature_resize: str = "bilinear",
        train_strategies: Sequence[TrainStrategy] = ("random", "block", "foreground"),
        train_random_ratio: float = 0.766,
        train_block_ratio: float = 0.358,
        foreground_max_ratio: float = 0.5,
        coreset_ratio: float = 0.1,
        calibration_maps: int = 256,
        lr: float = 1e-4,
        weight_decay: float = 0.04,
        betas: tuple[float, float] = (0.9, 0.999),
        flow_lr: float = 2e-4,
        gradient_clip_val: float | None = None,
        image_size: int = 224,
        per_category_metrics: bool = True,
        pre_processor: PreProcessor | bool = True,
        post_processor: PostProcessor | bool = True,
        evaluator: Evaluator | bool = True,
        visualizer: Visualizer | bool = True,
    ) -> None:
        strategies = [str(s) for s in train_strategies]
        if not strategies or any(s not in TRAIN_STRATEGIES for s in strategies):
            msg = f"train_strategies must be a non-empty subset of {TRAIN_STRATEGIES}, got {list(train_strategies)}"
            raise ValueError(msg)
        if not 0.0 < foreground_max_ratio < 1.0:
            msg = f"foreground_max_ratio must lie in (0, 1), got {foreground_max_ratio}"
            raise ValueError(msg)
        if not 0.0 < coreset_ratio <= 1.0:
            msg = f"coreset_ratio must lie in (0, 1], got {coreset_ratio}"
            raise ValueError(msg)
        self.image_size = image_size
        super().__init__(pre_processor=pre_processor, post_processor=post_processor, evaluator=evaluator, visualizer=visualizer)
        self.save_hyperparameters(ignore=["pre_processor", "post_processor", "evaluator", "visualizer"])
        self.per_category_metrics = per_category_metrics
        self.model = MaskAdModel(
            backbone=backbone,
            pretrained=pretrained,
            stages=stages,
            feature_size=feature_size,
            embed_dim=embed_dim,
            num_heads=num_heads,
            mlp_ratio=mlp_ratio,
            num_encoder_layers=num_encoder_layers,
            num_decoder_layers=num_decoder_layers,
            n_masks=n_masks,
            random_ratio=random_ratio,
            block_ratio=block_ratio,
            prototype_ratio_range=prototype_ratio_range,
            empty_mask=empty_mask,
            mask_banks=mask_banks,
            po_ratio=po_ratio,
            block_min_patches=block_min_patches,
            block_min_aspect=block_min_aspect,
            mask_seed=mask_seed,
            flow_coupling=flow_coupling,
            flow_clamp=flow_clamp,
            flow_condition_dim=flow_condition_dim,
            flow_hidden_ratio=flow_hidden_ratio,
            sinkhorn_epsilon=sinkhorn_epsilon,
            sinkhorn_iterations=sinkhorn_iterations,
            ot_weight=ot_weight,
            ot_scale=ot_scale,
            blur_sigma=blur_sigma,
            parallel=parallel,
            use_po=use_po,
            use_reference=use_reference,
            use_assdis=use_assdis,
            use_rec=use_rec,
            restrict_to_category=restrict_to_category,
            normalize_features=normalize_features,
            feature_resize=feature_resize,
        )
        grid = (feature_size, feature_size)
        self.train_generators = {
            "random": RandomMaskGenerator(grid, train_random_ratio),
            "block": BlockwiseMaskGenerator(grid, train_block_ratio, min_patches=block_min_patches, min_aspect=block_min_aspect),
        }
        self.train_strategies = strategies
        self.foreground_generator = ForegroundMaskGenerator(grid, foreground_max_ratio)
        self.mask_rng = torch.Generator().manual_seed(int(mask_seed) + 1)
        self.loss = MaskAdLoss()
        self._calibration: torch.Tensor | None = None
        self._memory_stale = True  # the flow trained since M_po was calibrated

    # ------------------------------------------------------------------ setup
    def configure_pre_processor(self, image_size: tuple[int, int] | None = None) -> PreProcessor:  # type: ignore[override]
        """Resize to ``image_size`` (224) square and normalise with ImageNet statistics."""
        size = image_size or (getattr(self, "image_size", 224),) * 2
        return resize_crop_normalize(size)

    @property
    def trainable_modules(self) -> list[torch.nn.Parameter]:
        """Reconstructor and flow parameters (the backbone is frozen)."""
        return [p for n, p in self.model.named_parameters() if not n.startswith("backbone.")]

    def configure_optimizers(self) -> OptimizerLRScheduler:
        """AdamW (wd 0.04) on the reconstructor; the flow in its own group without weight decay."""
        hp = self.hparams
        return torch.optim.AdamW(
            [
                {"params": list(self.model.reconstructor.parameters()), "lr": hp.lr, "weight_decay": hp.weight_decay},
                {"params": list(self.model.flow.parameters()), "lr": hp.flow_lr, "weight_decay": 0.0},
            ],
            lr=hp.lr,
            betas=tuple(hp.betas),
        )

    # ------------------------------------------------------------------ training
    def training_masks(self, features: torch.Tensor) -> tuple[str, torch.Tensor]:
        """One strategy for the whole batch, a fresh mask per image: (name, bool (B, h, w))."""
        pick = int(torch.randint(len(self.train_strategies), (1,), generator=self.mask_rng))
        strategy = self.train_strategies[pick]
        batch = features.shape[0]
        if strategy == "foreground":
            return strategy, self.foreground_generator(features, self.mask_rng)
        generator = self.train_generators[strategy]
        masks = torch.stack([generator(self.mask_rng) for _ in range(batch)])
        return strategy, masks.to(features.device)

    def training_step(self, batch: Batch, *args: Any, **kwargs: Any) -> STEP_OUTPUT:  # noqa: ANN401
        """Masked reconstruction loss plus the flow's negative log-likelihood (independent parameters)."""
        del args, kwargs
        with torch.no_grad():
            features = self.model.features(batch.image)
            residual = features - self.model.reference(features) if not self.model.bank.is_empty else features
        strategy, mask = self.training_masks(features)
        reconstructed = self.model.reconstruct(features, mask)
        flow_nll = self.model.flow.nll(residual).mean()
        losses = self.loss(features, reconstructed, flow_nll)
        size = batch.image.shape[0]
        self.log("train_loss", losses["loss"], on_step=True, on_epoch=False, prog_bar=True, batch_size=size)
        self.log("train_reconstruction", losses["reconstruction"], on_step=True, on_epoch=False, batch_size=size)
        self.log("train_flow_nll", losses["flow_nll"], on_step=True, on_epoch=False, batch_size=size)
        self.log(f"train_mask_{strategy}", 1.0, on_step=True, on_epoch=False, batch_size=size)
        self._memory_stale = True
        return {"loss": losses["loss"], "reconstruction": losses["reconstruction"].detach(), "flow_nll": losses["flow_nll"].detach()}

    # ------------------------------------------------------------------ memory
    def _training_batches(self) -> Any:  # noqa: ANN401
        """The whole training set in file order, independent of the trainer's loader.

        Not the trainer's (rank-sharded under DDP, shuffled) loader: every process reads every
        training image in the same order, so the coreset, the M_po calibration subset and the
        feature statistics are the same with 1 or k processes and for any shuffle seed
        (``components.distributed.full_training_loader``).
        """
        return full_training_loader(self.trainer) if self._trainer is not None else None

    @torch.no_grad()
    def collect_training_features(self, batches: Any, raw: bool = False) -> tuple[torch.Tensor, torch.Tensor]:  # noqa: ANN401
        """Feature maps (N, C, h, w) (standardised, or ``raw``) and category indices (N,) of every training image.

        Written batch by batch into tensors of the dataset's size (``collect_batches``): one copy of
        the training set's maps, not a list of batches plus their concatenation.
        """

        def extract(batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
            images = batch.image.to(self.device)
            if isinstance(self.pre_processor, PreProcessor) and self.pre_processor.transform is not None:
                # the batches' own transform (antialiased resize), not the export transform
                images = self.pre_processor.transform(images)
            features = self.model.raw_features(images) if raw else self.model.features(images)
            index = getattr(batch, "category_index", None)
            index = torch.zeros(images.shape[0], dtype=torch.long) if index is None else torch.as_tensor(index).long().reshape(-1)
            return features.float(), index.to(self.device)

        collected = collect_batches(batches, extract)
        if not collected:
            msg = "MaskAD found no training images to build its nominal coreset from (empty training set)"
            raise ValueError(msg)
        maps, labels = collected
        return maps, labels

    @torch.no_grad()
    def build_bank(self, features: torch.Tensor, labels: torch.Tensor | None = None) -> None:
        """Per-category k-center-greedy coreset of standardised training maps (N, C, h, w); keeps calibration maps.

        The coreset reads each category's patch rows through a permuted view of the maps, so no
        flattened copy of the whole training set's patches is made (same rows, same order, same picks).
        """
        if labels is None:
            labels = torch.zeros(features.shape[0], dtype=torch.long, device=features.device)
        patches = features.permute(0, 2, 3, 1).flatten(1, 2)  # (N, h * w, C) view: each image's patch rows
        self.model.bank.fit_per_category(patches, labels, self.hparams.coreset_ratio, seed=self.hparams.mask_seed, project=False)
        self.keep_calibration_maps(features)

    def keep_calibration_maps(self, features: torch.Tensor) -> None:
        """Keep ``calibration_maps`` training maps (a seeded random subset of (N, C, h, w)) for M_po's calibration."""
        generator = torch.Generator().manual_seed(int(self.hparams.mask_seed))
        keep = torch.randperm(features.shape[0], generator=generator)[: self.hparams.calibration_maps]
        self._calibration = features[keep.to(features.device)].detach()

    @torch.no_grad()
    def fit_memory(self, features: torch.Tensor | None = None, labels: torch.Tensor | None = None) -> None:
        """Build the per-category coreset (if still empty) and calibrate M_po on training feature maps.

        Normally the coreset is built at the start of training (the ProtoFlow trains on residuals to
        it); without arguments the training set is read when something is missing. A no-op when
        nothing changed.
        """
        needs_bank = self.model.bank.is_empty
        if not needs_bank and not self._memory_stale:
            return
        if features is None and (needs_bank or self._calibration is None):
            batches = self._training_batches()
            if batches is None:
                if needs_bank:
                    msg = "MaskAD has no coreset: fit it on a datamodule with training images (or load a checkpoint)"
                    raise NotFittedError(msg)
                return
            features, labels = self.collect_training_features(batches)
        if features is not None:
            if needs_bank:
                self.build_bank(features, labels)
            else:
                self.keep_calibration_maps(features)
        self.calibrate_po()
        self._memory_stale = False

    @torch.no_grad()
    def calibrate_po(self) -> None:
        """M_po's reference: the ProtoFlow log-likelihood of the calibration patches' residuals, top ``po_ratio`` quantile (0: max)."""
        if self._calibration is None or self.model.bank.is_empty:
            return
        was_training = self.model.training
        self.model.eval()
        logp = torch.cat([self.model.log_likelihood(chunk - self.model.reference(chunk)) for chunk in self._calibration.split(32)])
        flat = logp.flatten().float()
        reference = flat.max() if self.model.po_ratio == 0 else torch.quantile(flat, 1.0 - self.model.po_ratio)
        self.model.po_scale.fill_(float(reference))
        self.model.train(was_training)

    def on_train_start(self) -> None:
        """One pass over the training set (first fit only): feature statistics, then the coreset.

        The ProtoFlow trains on residuals to the coreset, so the coreset is built before the first
        step (the backbone is frozen: the features do not change). ``super()`` first: a resumed run
        continues its random streams.
        """
        super().on_train_start()
        needs_stats = self.model.normalize_features and not bool(self.model.statistics_fitted)
        if not needs_stats and not self.model.bank.is_empty:
            return
        batches = self._training_batches()
        if batches is None:
            msg = "MaskAD needs the training dataloader to standardise its features and build its coreset"
            raise RuntimeError(msg)
        features, labels = self.collect_training_features(batches, raw=True)
        if needs_stats:
            self.model.fit_feature_statistics(features)
        if self.model.normalize_features:  # in place: the raw maps are not needed again (same values as (raw - mean) / std)
            features.sub_(self.model.feature_mean).div_(self.model.feature_std)
        if self.model.bank.is_empty:
            self.build_bank(features, labels)

    def on_validation_start(self) -> None:
        """Build/refresh the coreset and M_po before scoring."""
        self.fit_memory()

    def on_test_start(self) -> None:
        """As :meth:`on_validation_start`."""
        self.fit_memory()

    def on_predict_start(self) -> None:
        """As :meth:`on_validation_start` (a loaded checkpoint already holds the memory)."""
        if self.model.bank.is_empty or self._memory_stale and self._calibration is not None:
            self.fit_memory()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Write the coreset and M_po with the weights even if no validation ran after training."""
        super().on_save_checkpoint(checkpoint)
        if self.model.bank.is_empty or self._memory_stale:
            self.fit_memory()
            checkpoint["state_dict"] = self.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """A loaded checkpoint holds the coreset and M_po: nothing to rebuild until training resumes."""
        super().on_load_checkpoint(checkpoint)
        self._memory_stale = False

    # ------------------------------------------------------------------ scoring
    def validation_step(self, batch: Batch, *args: Any, **kwargs: Any) -> STEP_OUTPUT:  # noqa: ANN401
        """Score from the image; with ``restrict_to_category`` the reference search uses the batch's category."""
        del args, kwargs
        category = None
        if self.model.restrict_to_category:
            category = getattr(batch, "category_index", None)
            if category is None:
                msg = "restrict_to_category=True needs batches with category_index (anomalib_mcad.data.MultiClassDataModule)"
                raise ValueError(msg)
            category = torch.as_tensor(category, device=batch.image.device).long().reshape(-1)
        predictions = self.model(batch.image, category_index=category)
        return batch.update(pred_score=predictions.pred_score, anomaly_map=predictions.anomaly_map)
