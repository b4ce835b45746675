"""Dinomaly as an anomalib module: trains through anomalib's Engine, CLI and export."""

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
from anomalib_mcad.models.image.dinomaly.loss import GlobalCosineHardMiningLoss
from anomalib_mcad.models.image.dinomaly.torch_model import DEFAULT_GROUPS, DinomalyModel

class Dinomaly(McadModule):
    """Dinomaly (Guo et al., CVPR 2025), faithful to the authors' multi-class recipe.

    Defaults are the paper's (supplementary sec. B) and the authors' ``dinomaly_mvtec_uni.py``;
    see this folder's README for each default's source and every departure from anomalib's
    built-in ``anomalib.models.Dinomaly``.

    Args:
        encoder_name: timm DINOv2 encoder (``vit_{small,base,large}_patch14_reg4_dinov2``).
        pretrained: ``True`` (download), ``False`` (random) or a local weights file.
        target_layers, groups, bottleneck_dropout, decoder_depth, mlp_bias,
        pos_embed_interpolation, eval_size, blur_padding, top_k_ratio, output_map:
            see :class:`DinomalyModel`.
        lr, final_lr, warmup_iters, weight_decay, betas, eps, amsgrad: StableAdamW and the
            warm-up + cosine schedule, stepped every iteration. The schedule spans the
            trainer's total steps (``max_steps``, or ``max_epochs`` x batches per epoch).
        hard_mining_p, hard_mining_warmup_iters, hard_mining_factor: the loose loss.
        gradient_clip_val: gradient-norm clipping (0.1 in the authors' code).
        image_size, crop_size: pre-processing (resize 448, center-crop 392).
        per_category_metrics: add :class:`~anomalib_mcad.metrics.PerCategoryMetrics` so
            ``test`` prints and saves the per-category table.
    """

    def __init__(
        self,
        encoder_name: str = "vit_base_patch14_reg4_dinov2",
        pretrained: PretrainedArg = True,
        target_layers: Sequence[int] | None = None,
        groups: Sequence[Sequence[int]] = DEFAULT_GROUPS,
        bottleneck_dropout: float = 0.2,
        decoder_depth: int = 8,
        mlp_bias: bool = True,
        pos_embed_interpolation: PosEmbedInterpolation = "dinov2",
        eval_size: int | None = 256,
        blur_padding: Literal["zeros", "reflect"] = "zeros",
        top_k_ratio: float = 0.01,
        output_map: Literal["smoothed", "raw"] = "smoothed",
        lr: float = 2e-3,
        final_lr: float = 2e-4,
        warmup_iters: int = 100,
        weight_decay: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-10,
        amsgrad: bool = True,
        hard_mining_p: float = 0.9,
        hard_mining_warmup_iters: int = 1000,
        hard_mining_factor: float = 0.1,
        gradient_clip_val: float = 0.1,
        image_size: int = 448,
        crop_size: int | None = 392,
        per_category_metrics: bool = True,
        pre_processor: PreProcessor | bool = True,
        post_processor: PostProcessor | bool = True,
        evaluator: Evaluator | bool = True,
        visualizer: Visualizer | bool = True,
    ) -> None:
        self.image_size = image_size
        self.crop_size = crop_size
        super().__init__(
            pre_processor=pre_processor,
            post_processor=post_processor,
            evaluator=evaluator,
            visualizer=visualizer,
        )
        self.save_hyperparameters(ignore=["pre_processor", "post_processor", "evaluator", "visualizer"])
        self.model = DinomalyModel(
            encoder_name=encoder_name,
            pretrained=pretrained,
            target_layers=target_layers,
            groups=groups,
            bottleneck_dropout=bottleneck_dropout,
            decoder_depth=decoder_depth,
            mlp_bias=mlp_bias,
            pos_embed_interpolation=pos_embed_interpolation,
            eval_size=eval_size,
            blur_padding=blur_padding,
            top_k_ratio=top_k_ratio,
            output_map=output_map,
        )
        self.loss = GlobalCosineHardMiningLoss(hard_mining_p, hard_mining_warmup_iters, hard_mining_factor)
        self.per_category_metrics = per_category_metrics

    def configure_pre_processor(self, image_size: tuple[int, int] | None = None) -> PreProcessor:  # type: ignore[override]
        """Resize to ``image_size`` (448) and center-crop to ``crop_size`` (392), ImageNet stats."""
        size = image_size[0] if image_size is not None else getattr(self, "image_size", 448)
        return resize_crop_normalize(size, getattr(self, "crop_size", 392))

    @property
    def trainable_modules(self) -> torch.nn.ModuleList:
        """The bottleneck and decoder: everything but the frozen encoder."""
        return torch.nn.ModuleList([self.model.bottleneck, self.model.decoder])

    def training_step(self, batch: Batch, *args: Any, **kwargs: Any) -> STEP_OUTPUT:  # noqa: ANN401
        """Reconstruct the encoder's middle blocks; loss is the hard-mined global cosine."""
        del args, kwargs
        encoder, decoder = self.model(batch.image)
        loss = self.loss(encoder, decoder, step=self.global_step)
        self.log("train_loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=batch.image.shape[0])
        return {"loss": loss}

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
            length_hint="set trainer max_steps (10000 in the paper) or max_epochs",
        )
