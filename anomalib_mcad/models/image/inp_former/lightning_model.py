"""INP-Former as an anomalib module: trains through anomalib's Engine, CLI and export."""

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

from anomalib_mcad.models.components.base import McadModule
from anomalib_mcad.models.components.optim import stable_adamw_warmup_cosine
from anomalib_mcad.models.components.pre_processing import resize_crop_normalize
from anomalib_mcad.models.components.vit import PosEmbedInterpolation
from anomalib_mcad.models.components.weights import PretrainedArg
from anomalib_mcad.models.image.inp_former.augmentation import FewShotAugmentation
from anomalib_mcad.models.image.inp_former.loss import InpFormerLoss
from anomalib_mcad.models.image.inp_former.torch_model import DEFAULT_GROUPS, InpFormerModel


class InpFormer(McadModule):
    """INP-Former (Luo et al., CVPR 2025), faithful to the authors' code.

    One class serves the four settings; the data decides which (see this folder's README):
    multi-class (all categories in one datamodule), single-class (one category), few-shot
    (``k_shot`` images per category and ``few_shot_augmentation=True``) and zero-shot
    (``zero_shot=True`` on a model trained on other categories; nothing is trained).

    Args:
        encoder_name: timm DINOv2 encoder (``vit_{small,base,large}_patch14_reg4_dinov2``).
        pretrained: ``True`` (download), ``False`` (random) or a local weights file.
        target_layers, groups, num_prototypes, decoder_depth, bottleneck_dropout, mlp_bias,
        pos_embed_interpolation, eval_size, blur_padding, top_k_ratio, output_map, zero_shot:
            see :class:`InpFormerModel`.
        coherence_weight: lambda, the weight of the INP coherence loss (0.2).
        soft_mining_power: exponent of the soft-mining gradient weight (3).
        lr, final_lr, warmup_iters, weight_decay, betas, eps, amsgrad: StableAdamW and the
            warm-up + cosine schedule, stepped every iteration over the trainer's total steps.
        gradient_clip_val: gradient-norm clipping (0.1).
        few_shot_augmentation: replace each training image by one of the authors' 22 views.
        image_size, crop_size: pre-processing (resize 448, center-crop 392).
        per_category_metrics: ``test`` prints and saves the per-category table.
    """

    def __init__(
        self,
        encoder_name: str = "vit_base_patch14_reg4_dinov2",
        pretrained: PretrainedArg = True,
        target_layers: Sequence[int] | None = None,
        groups: Sequence[Sequence[int]] = DEFAULT_GROUPS,
        num_prototypes: int = 6,
        decoder_depth: int = 8,
        bottleneck_dropout: float = 0.0,
        mlp_bias: bool = True,
        pos_embed_interpolation: PosEmbedInterpolation = "dinov2",
        eval_size: int | None = 256,
        blur_padding: Literal["zeros", "reflect"] = "zeros",
        top_k_ratio: float = 0.01,
        output_map: Literal["smoothed", "raw"] = "smoothed",
        zero_shot: bool = False,
        coherence_weight: float = 0.2,
        soft_mining_power: float = 3.0,
        lr: float = 1e-3,
        final_lr: float = 1e-4,
        warmup_iters: int = 100,
        weight_decay: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-10,
        amsgrad: bool = True,
        gradient_clip_val: float = 0.1,
        few_shot_augmentation: bool = False,
        image_size: int = 448,
        crop_size: int | None = 392,
        per_category_metrics: bool = True,
        pre_processor: PreProcessor | bool = True,
        post_processor: PostProcessor | bool = True,
        evaluator: Evaluator | bool = True,
        visualizer: Visualizer | bool = True,
    ) -> None:
        if crop_size is not None and crop_size > image_size:
            msg = f"crop_size ({crop_size}) cannot exceed image_size ({image_size})"
            raise ValueError(msg)
        self.image_size = image_size
        self.crop_size = crop_size
        super().__init__(
            pre_processor=pre_processor,
            post_processor=post_processor,
            evaluator=evaluator,
            visualizer=visualizer,
        )
        self.save_hyperparameters(ignore=["pre_processor", "post_processor", "evaluator", "visualizer"])
        self.model = InpFormerModel(
            encoder_name=encoder_name,
            pretrained=pretrained,
            target_layers=target_layers,
            groups=groups,
            num_prototypes=num_prototypes,
            decoder_depth=decoder_depth,
            bottleneck_dropout=bottleneck_dropout,
            mlp_bias=mlp_bias,
            pos_embed_interpolation=pos_embed_interpolation,
            eval_size=eval_size,
            blur_padding=blur_padding,
            top_k_ratio=top_k_ratio,
            output_map=output_map,
            zero_shot=zero_shot,
        )
        self.loss = InpFormerLoss(coherence_weight, soft_mining_power)
        self.augmentation = FewShotAugmentation() if few_shot_augmentation else None
        self.per_category_metrics = per_category_metrics

    def configure_pre_processor(self, image_size: tuple[int, int] | None = None) -> PreProcessor:  # type: ignore[override]
        """Resize to ``image_size`` (448) square, center-crop to ``crop_size`` (392), ImageNet stats."""
        size = image_size[0] if image_size is not None else getattr(self, "image_size", 448)
        return resize_crop_normalize(size, getattr(self, "crop_size", 392))

    @property
    def trainable_modules(self) -> torch.nn.ModuleList:
        """INP extractor (with its prototype tokens), bottleneck and decoder."""
        return torch.nn.ModuleList([self.model.extractor, self.model.bottleneck, self.model.decoder])

    def training_step(self, batch: Batch, *args: Any, **kwargs: Any) -> STEP_OUTPUT:  # noqa: ANN401
        """Reconstruct the encoder's blocks from the image's INPs; soft-mining + coherence loss."""
        del args, kwargs
        images = batch.image
        if self.augmentation is not None:
            images = self.augmentation(images)
        features = self.model(images)
        losses = self.loss(features.encoder, features.decoder, features.inp_distance)
        n = images.shape[0]
        self.log("train_loss", losses["loss"], on_step=True, on_epoch=True, prog_bar=True, batch_size=n)
        self.log("train_coherence", losses["coherence"], on_step=True, on_epoch=False, batch_size=n)
        return {"loss": losses["loss"], "reconstruction": losses["reconstruction"].detach(), "coherence": losses["coherence"].detach()}

    def configure_optimizers(self) -> OptimizerLRScheduler:
        """StableAdamW (AMSGrad) with warm-up + cosine, stepped per iteration."""
        hp = self.hparams
        return stable_adamw_warmup_cosine(
            self.trainable_modules.parameters(),
            lr=hp.lr,
            betas=hp.betas,
            eps=hp.eps,
            weight_decay=hp.weight_decay,
            amsgrad=hp.amsgrad,
            warmup_iters=hp.warmup_iters,
            final_lr=hp.final_lr,
            total_steps=self.trainer.estimated_stepping_batches,
            length_hint="set trainer max_epochs (200 in the paper) or max_steps",
        )
