"""MINT-AD as an anomalib module: class labels in training only, an image-only model at inference and export."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from anomalib.data import Batch
from anomalib.metrics import Evaluator
from anomalib.post_processing import PostProcessor
from anomalib.pre_processing import PreProcessor
from anomalib.visualization import Visualizer
from lightning.pytorch.utilities.types import STEP_OUTPUT, OptimizerLRScheduler

from anomalib_mcad.models.components.validation import NotFittedError
from anomalib_mcad.models.components.base import McadModule
from anomalib_mcad.models.components.pre_processing import resize_crop_normalize
from anomalib_mcad.models.components.weights import PretrainedArg
from anomalib_mcad.models.image.mint_ad.loss import MintAdLoss
from anomalib_mcad.models.image.mint_ad.torch_model import PROMPT_TYPES, MintAdModel, PromptType, ScoreType

NO_CATEGORIES_HINT = (
    "Train with anomalib_mcad.data.MultiClassDataModule (it also reads a single category), "
    "or use prompt_type='image', which needs no labels."
)


class MintAd(McadModule):
    """MINT-AD (Jiang et al., ECCV 2024): class-aware unified reconstruction with an INR query.

    Defaults are the paper's (seed 002: sec. 3, 4.1, appendix C.2) and UniAD's configuration it
    adopts; the README in this folder gives each default's source. Training reads each image's
    category (``batch.category_index``) from :class:`~anomalib_mcad.data.MultiClassDataModule`;
    inference and the exported model take only the image.

    Args:
        backbone, pretrained, stages, feature_size, prompt_type, hidden_dim, num_heads,
        ffn_dim, dropout, num_encoder_layers, num_decoder_layers, token_dim, jitter_scale,
        jitter_prob, head_on_log_token, query_every_layer, score, feature_norm: see :class:`MintAdModel`.
        num_classes: training categories; ``None`` takes the datamodule's
            ``num_train_categories`` when training starts (stored in the checkpoint).
        ce_weight, prior_weight: ``lambda_a`` = 1.0 and ``lambda_b`` = 0.1 of eq. 6.
        prior_detach: the prior NLL does not pull the adapted features (only the distribution learns).
        lr, weight_decay, betas: AdamW (1e-4, 1e-4, (0.9, 0.999)).
        lr_drop_at, lr_drop_factor: the rate is multiplied by 0.1 after 80 % of the training
            steps (800 of 1,000 epochs in the paper).
        gradient_clip_val: 0.1 (UniAD's ``clip_max_norm``).
        image_size: inputs are resized to this square size (224).
        per_category_metrics: print and save the per-category table after ``test``.
    """

    def __init__(
        self,
        backbone: str = "efficientnet_b4",
        pretrained: PretrainedArg = True,
        stages: Sequence[int] = (0, 1, 2, 3),
        feature_size: int = 14,
        num_classes: int | None = None,
        prompt_type: PromptType = "feature",
        hidden_dim: int = 256,
        num_heads: int = 8,
        ffn_dim: int = 1024,
        dropout: float = 0.1,
        num_encoder_layers: int = 4,
        num_decoder_layers: int = 4,
        token_dim: int = 32,
        jitter_scale: float = 20.0,
        jitter_prob: float = 1.0,
        head_on_log_token: bool = True,
        query_every_layer: bool = False,
        score: ScoreType = "max",
        feature_norm: bool = False,
        ce_weight: float = 1.0,
        prior_weight: float = 0.1,
        prior_detach: bool = False,
        lr: float = 1e-4,
        weight_decay: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.999),
        lr_drop_at: float = 0.8,
        lr_drop_factor: float = 0.1,
        gradient_clip_val: float = 0.1,
        image_size: int = 224,
        per_category_metrics: bool = True,
        pre_processor: PreProcessor | bool = True,
        post_processor: PostProcessor | bool = True,
        evaluator: Evaluator | bool = True,
        visualizer: Visualizer | bool = True,
    ) -> None:
        if prompt_type not in PROMPT_TYPES:
            msg = f"prompt_type must be one of {PROMPT_TYPES}, got {prompt_type!r}"
            raise ValueError(msg)
        if not 0.0 < lr_drop_at <= 1.0:
            msg = f"lr_drop_at must be in (0, 1], got {lr_drop_at}"
            raise ValueError(msg)
        self.image_size = image_size
        super().__init__(
            pre_processor=pre_processor,
            post_processor=post_processor,
            evaluator=evaluator,
            visualizer=visualizer,
        )
        self.save_hyperparameters(ignore=["pre_processor", "post_processor", "evaluator", "visualizer"])
        self.loss = MintAdLoss(ce_weight=ce_weight, prior_weight=prior_weight, prior_detach=prior_detach)
        self.per_category_metrics = per_category_metrics
        self.model: MintAdModel | None = None
        if num_classes is not None or not self.needs_labels:
            self._build_model(num_classes)

    @property
    def needs_labels(self) -> bool:
        """Whether training needs category labels (feature and label prompts)."""
        return self.hparams.prompt_type in ("feature", "label")

    def _build_model(self, num_classes: int | None) -> None:
        hp = self.hparams
        self.hparams["num_classes"] = num_classes
        self.model = MintAdModel(
            backbone=hp.backbone,
            pretrained=hp.pretrained,
            stages=hp.stages,
            feature_size=hp.feature_size,
            num_classes=num_classes,
            prompt_type=hp.prompt_type,
            hidden_dim=hp.hidden_dim,
            num_heads=hp.num_heads,
            ffn_dim=hp.ffn_dim,
            dropout=hp.dropout,
            num_encoder_layers=hp.num_encoder_layers,
            num_decoder_layers=hp.num_decoder_layers,
            token_dim=hp.token_dim,
            jitter_scale=hp.jitter_scale,
            jitter_prob=hp.jitter_prob,
            head_on_log_token=hp.get("head_on_log_token", True),
            query_every_layer=hp.get("query_every_layer", False),
            score=hp.get("score", "max"),
            feature_norm=hp.get("feature_norm", False),
        )

    def setup(self, stage: str | None = None) -> None:
        """Take the number of training categories from the datamodule if it was not given.

        Lightning calls this before it restores a checkpoint. Outside ``fit`` a datamodule without
        categories (anomalib's predict on a folder) is fine: the network is then built from the
        checkpoint's category count, and without a checkpoint the first forward names the problem.
        """
        super().setup(stage)
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        available = getattr(datamodule, "num_train_categories", None)
        if self.model is None:
            if available is None and stage != "fit":
                return  # test/predict from a checkpoint: on_load_checkpoint builds it (else _require_model errors)
            if available is None:
                msg = (
                    f"MINT-AD's '{self.hparams.prompt_type}' prompt needs the number of training categories, and the "
                    f"datamodule ({type(datamodule).__name__}) has no categories. {NO_CATEGORIES_HINT}"
                )
                raise ValueError(msg)
            self._build_model(int(available))
        elif self.needs_labels and available is not None and stage == "fit" and int(available) != self.hparams.num_classes:
            msg = f"MINT-AD was built for {self.hparams.num_classes} categories but the datamodule trains on {available}"
            raise ValueError(msg)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Build the network for the checkpoint's number of categories before its weights are loaded."""
        super().on_load_checkpoint(checkpoint)
        if self.model is None:
            stored = checkpoint.get("hyper_parameters", {}).get("num_classes")
            if stored is None:
                head = checkpoint.get("state_dict", {}).get("model.prompt_mapper.head.weight")
                stored = None if head is None else int(head.shape[0])
            if stored is None:
                msg = "Checkpoint does not say how many categories MINT-AD was trained on"
                raise ValueError(msg)
            self._build_model(int(stored))

    def configure_pre_processor(self, image_size: tuple[int, int] | None = None) -> PreProcessor:  # type: ignore[override]
        """Resize to ``image_size`` (224) square and normalise with ImageNet statistics (UniAD)."""
        size = image_size or (getattr(self, "image_size", 224),) * 2
        return resize_crop_normalize(size)

    @property
    def scoring_network(self) -> MintAdModel:
        """The network; built when training starts or a checkpoint is loaded."""
        return self._require_model()

    def _require_model(self) -> MintAdModel:
        if self.model is None:
            msg = f"MINT-AD's network is built when training starts (num_classes=None). {NO_CATEGORIES_HINT}"
            raise NotFittedError(msg)
        return self.model

    @property
    def trainable_modules(self) -> list[torch.nn.Parameter]:
        """Every parameter but the frozen backbone's."""
        return [p for n, p in self._require_model().named_parameters() if not n.startswith("backbone.")]

    def _labels(self, batch: Batch) -> torch.Tensor | None:
        labels = getattr(batch, "category_index", None)
        if not self.needs_labels:
            return None
        if labels is None:
            msg = f"MINT-AD's '{self.hparams.prompt_type}' prompt trains with category labels, and this batch has none. {NO_CATEGORIES_HINT}"
            raise ValueError(msg)
        labels = torch.as_tensor(labels, device=batch.image.device).long().reshape(-1)
        n = int(self.hparams.num_classes)
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= n):
            msg = f"Category index {int(labels.max())} is not one of the {n} training categories"
            raise ValueError(msg)
        return labels

    def training_step(self, batch: Batch, *args: Any, **kwargs: Any) -> STEP_OUTPUT:  # noqa: ANN401
        """Reconstruct, classify and fit the prior; the loss is eq. 6."""
        del args, kwargs
        model = self._require_model()
        labels = self._labels(batch)
        out = model(batch.image, category_index=labels)
        losses = self.loss(out.original, out.reconstructed, out.adapted, out.prior_mean, out.prior_var, out.logits, labels)
        size = batch.image.shape[0]
        for name, value in losses.items():
            self.log(f"train_{name}", value, on_step=True, on_epoch=False, prog_bar=name == "loss", batch_size=size)
        if out.logits is not None and labels is not None:
            accuracy = (out.logits.argmax(dim=-1) == labels).float().mean()
            self.log("train_class_accuracy", accuracy, on_step=True, on_epoch=False, batch_size=size)
        return {"loss": losses["loss"], **{k: v.detach() for k, v in losses.items() if k != "loss"}}

    def configure_optimizers(self) -> OptimizerLRScheduler:
        """AdamW; the rate drops by ``lr_drop_factor`` after ``lr_drop_at`` of the training steps."""
        hp = self.hparams
        optimizer = torch.optim.AdamW(self.trainable_modules, lr=hp.lr, betas=tuple(hp.betas), weight_decay=hp.weight_decay)
        total = self.trainer.estimated_stepping_batches
        if total <= 0 or total == float("inf"):
            msg = "MINT-AD needs a finite training length: set trainer max_epochs (1000 in the paper) or max_steps"
            raise ValueError(msg)
        milestone = max(int(int(total) * hp.lr_drop_at), 1)
        scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=[milestone], gamma=hp.lr_drop_factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
