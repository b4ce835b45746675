"""PMAD as an anomalib module: MIM and ProtoFlow trained in one ``Engine.fit``, image-only inference.

Training phases inside one fit (manual optimisation, two optimisers):

* **Before the first epoch** (``on_train_start``): one pass of the frozen EfficientNet over the
  training set; a k-center-greedy coreset of each category's patch features becomes the
  prototype pool. (The backbone is frozen, so this is exactly the authors' separate
  ``generate_prototypes.py`` step.)
* **Every step of epochs 0 .. flow_epochs-1**: ProtoFlow's flow takes one step on the residual
  features of an augmented view of the batch (RandomResizedCrop 0.2-1 + flip, the authors'
  transform), each patch minus its nearest prototype of the image's own category that does not
  come from the image itself (Adam, its own warm-up + cosine schedule, Table 5); afterwards it is frozen.
* **Every step of every epoch**: the masked image model takes one step (AdamW, warm-up + cosine,
  clip 3.0, Table 5) on masks from the combinational strategy (appendix B) at the image's
  category mask ratio (Table 6, as the authors' training does); dynamic weights and the
  rank-based loss weights start at ``dynamic_start_epoch`` (epoch 100 of 300 in the authors' code).
* **After the flow's last epoch**: every training patch's held-out residual (nearest prototype of
  another image) goes through the flow; the ``reference_quantile`` of those NLLs (the minimum by
  default) is ProtoFlow's likelihood reference, the constant that replaces the authors' test-set
  maximum of ``log p / C``. (Until then a provisional reference, the smallest NLL of the epoch's
  flow inputs, lets a validation run.)
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from anomalib.data import Batch
from anomalib.metrics import Evaluator
from anomalib.post_processing import PostProcessor
from anomalib.pre_processing import PreProcessor
from anomalib.visualization import Visualizer
from lightning.pytorch.utilities.types import STEP_OUTPUT
from torch.nn import functional as F  # noqa: N812

from anomalib_mcad.models.components.base import McadModule
from anomalib_mcad.models.components.distributed import collect_batches, full_training_loader, gather_rows, reduce_min
from anomalib_mcad.models.components.foreground import foreground_mask
from anomalib_mcad.models.components.masking import CombinationalMaskGenerator, PatchErrorRecorder, rank_loss_weights
from anomalib_mcad.models.components.optim import WarmupCosineLR
from anomalib_mcad.models.components.pre_processing import resize_crop_normalize
from anomalib_mcad.models.components.validation import check_images
from anomalib_mcad.models.components.weights import PretrainedArg
from anomalib_mcad.models.image.pmad.protoflow import augmented_views
from anomalib_mcad.models.image.pmad.torch_model import MVTEC_MASK_RATIOS, PmadModel, TokenizerType


class Pmad(McadModule):
    """PMAD (Yao et al., AAAI 2023): proposal-masked anomaly detection with ProtoFlow, inductive.

    Defaults are the paper's (seed 000: appendix A-D, Tables 5-6) and the authors' code
    (xcyao00/PMAD); the README in this folder gives each default's source.

    Args:
        arch, image_size, patch_size, init_values, drop_path, pretrained: the masked image model
            (ViT-B/16 at 224, layer scale 0.1, drop path 0.1; ``pretrained`` = a local BEiT file).
        tokenizer, tokenizer_weights, vocab_size: ``"vit"`` (8192-code VQ ViT, the authors'
            default), ``"dalle"``, ``"small"`` (random, tests) or ``"features"`` (k-means codes of
            ProtoFlow's pretrained features fitted on the training set, ``vocab_size`` 256: the
            offline stand-in when no pretrained tokenizer exists); weights from a local file.
        proto_backbone, proto_stages, proto_pretrained, n_coupling, clamp, condition_dim,
        coreset_ratio: ProtoFlow (tf_efficientnet_b6 stages 2-3, 4 couplings, clamp 1.9, 128-d
            condition, 1 % coreset).
        support_coreset_ratio: share of the k-shot support patches of test categories kept as
            prototypes (1.0: all of them; few shots give few patches).
        prototype_search: ``"all"`` searches every prototype (image-only, as exported);
            ``"category"`` restricts Engine test/validation to the batch's category pool
            (the authors' per-class evaluation) when that category has prototypes.
        mask_ratios: category -> mask ratio; ``None`` = Table 6 (MVTec-AD names).
        default_mask_ratio: ratio for categories without one (0.3, the authors' default).
        deploy_category: image-only scoring (the exported graph, predictions on images without
            a category) uses this category's ratio. ``None`` (default): each image's category is
            inferred from its nearest prototypes (majority over patches) and its ratio used.
        min_mask_patches, min_aspect: blockwise masking (4, 0.3; Algorithm 1).
        dynamic_start_epoch: epoch from which dynamic weights are used (100).
        lr, min_lr, warmup_epochs, weight_decay, betas, gradient_clip_val: MIM optimiser
            (1.5e-3, 1e-5, 10, 0.05, (0.9, 0.999), 3.0; Table 5).
        flow_lr, flow_epochs, flow_warmup_epochs, flow_lr_decay: ProtoFlow optimiser (Adam 2e-4,
            200 epochs, cosine down to lr x 0.1^3; Table 5). Warm-up 16 epochs: Table 5's "2" counts
            the authors' meta-epochs of 8 sub-epochs each (``--meta-epochs 25 --sub-epochs 8``), i.e.
            8 % of the flow's training; shorter runs should keep that share.
        flow_augment: the flow trains on augmented views (RandomResizedCrop area 0.2-1, horizontal
            flip; the authors' ProtoFlow training transform), not on the images the prototypes came from.
        flow_holdout: a training patch's residual excludes prototypes of its own image (leave-one-
            image-out), so no residual is the exact zero of a patch that is its own prototype.
        flow_search: prototypes searched for the flow's training residuals: ``"category"`` (the
            image's own category, the authors' ``generate_prototype``) or ``"all"``.
        reference_quantile: ProtoFlow's likelihood reference is this quantile of the held-out
            NLLs of all training patches after the flow's training (0.0: their minimum, the
            inductive analogue of the authors' most likely test patch). ``None``: the older rule
            (smallest NLL of the flow's training inputs in the last epoch).
        sigma: Gaussian smoothing (4).
        seed: seeds the training mask generator.
    """

    #: Symmetric INT8 activations: with ProtoFlow in FP32, INT8 scores correlated 0.991 (42 calibration images) and
    #: 0.994 (21) with FP32's under "performance", 0.985 and 0.985 under "mixed" (README, "Memory and throughput").
    int8_preset = "performance"
    #: ProtoFlow's residual and flow stay FP32 under INT8 (its CNN does anyway): its NLL ranking picks the masked patches.
    int8_fp32_after_search = True

    def __init__(
        self,
        arch: str | dict[str, int] = "base",
        image_size: int = 224,
        patch_size: int = 16,
        init_values: float = 0.1,
        drop_path: float = 0.1,
        pretrained: PretrainedArg = False,
        tokenizer: TokenizerType = "vit",
        tokenizer_weights: str | None = None,
        vocab_size: int | None = None,
        proto_backbone: str = "tf_efficientnet_b6",
        proto_stages: Sequence[int] = (2, 3),
        proto_pretrained: PretrainedArg = True,
        n_coupling: int = 4,
        clamp: float = 1.9,
        condition_dim: int = 128,
        coreset_ratio: float = 0.01,
        support_coreset_ratio: float = 1.0,
        prototype_search: Literal["all", "category"] = "all",
        mask_ratios: Mapping[str, float] | None = None,
        default_mask_ratio: float = 0.3,
        deploy_category: str | None = None,
        min_mask_patches: int = 4,
        min_aspect: float = 0.3,
        dynamic_start_epoch: int = 100,
        lr: float = 1.5e-3,
        min_lr: float = 1e-5,
        warmup_epochs: int = 10,
        weight_decay: float = 0.05,
        betas: tuple[float, float] = (0.9, 0.999),
        gradient_clip_val: float = 3.0,
        flow_lr: float = 2e-4,
        flow_epochs: int = 200,
        flow_warmup_epochs: float = 16,
        flow_lr_decay: float = 0.1,
        flow_augment: bool = True,
        flow_holdout: bool = True,
        flow_search: Literal["all", "category"] = "category",
        reference_quantile: float | None = 0.0,
        sigma: float = 4.0,
        seed: int = 0,
        per_category_metrics: bool = True,
        pre_processor: PreProcessor | bool = True,
        post_processor: PostProcessor | bool = True,
        evaluator: Evaluator | bool = True,
        visualizer: Visualizer | bool = True,
    ) -> None:
        for name, value in (("prototype_search", prototype_search), ("flow_search", flow_search)):
            if value not in ("all", "category"):
                msg = f"{name} must be 'all' or 'category', got {value!r}"
                raise ValueError(msg)
        if reference_quantile is not None and not 0.0 <= float(reference_quantile) <= 1.0:
            msg = f"reference_quantile must lie in [0, 1] (or be None), got {reference_quantile}"
            raise ValueError(msg)
        ratios = dict(MVTEC_MASK_RATIOS if mask_ratios is None else mask_ratios)
        for name, ratio in [*ratios.items(), ("default_mask_ratio", default_mask_ratio)]:
            if not 0.0 < float(ratio) < 1.0:
                msg = f"mask ratio for '{name}' must lie in the open interval (0, 1), got {ratio}"
                raise ValueError(msg)
        self.image_size = image_size
        super().__init__(pre_processor=pre_processor, post_processor=post_processor, evaluator=evaluator, visualizer=visualizer)
        self.save_hyperparameters(ignore=["pre_processor", "post_processor", "evaluator", "visualizer"])
        self.automatic_optimization = False
        self.per_category_metrics = per_category_metrics
        self.mask_ratios = ratios
        self.model = PmadModel(
            arch=arch,
            img_size=image_size,
            patch_size=patch_size,
            init_values=init_values,
            drop_path=drop_path,
            pretrained=pretrained,
            tokenizer=tokenizer,
            tokenizer_weights=tokenizer_weights,
            vocab_size=vocab_size,
            proto_backbone=proto_backbone,
            proto_stages=proto_stages,
            proto_pretrained=proto_pretrained,
            n_coupling=n_coupling,
            clamp=clamp,
            condition_dim=condition_dim,
            coreset_ratio=coreset_ratio,
            default_mask_ratio=default_mask_ratio,
            sigma=sigma,
        )
        # mask counts must be possible for blockwise masking: the default is checked now, the
        # training categories' ratios when training starts (not mid-training)
        self._generators: dict[float, CombinationalMaskGenerator] = {}
        self._generator(float(default_mask_ratio))
        self.set_deploy_category(deploy_category)
        self.errors = PatchErrorRecorder(1, self.model.grid)
        self._mask_rng = torch.Generator().manual_seed(seed)
        self._new_epoch = True
        self._reference_fitted = False

    # ------------------------------------------------------------------ set-up
    def configure_pre_processor(self, image_size: tuple[int, int] | None = None) -> PreProcessor:  # type: ignore[override]
        """Resize to ``image_size`` (224) square and normalise with ImageNet statistics (the authors' transform)."""
        size = image_size or (getattr(self, "image_size", 224),) * 2
        return resize_crop_normalize(size)

    @property
    def trainer_arguments(self) -> dict[str, Any]:
        """No sanity validation; clipping is done in ``training_step`` (manual optimisation)."""
        return {"num_sanity_val_steps": 0}

    def _generator(self, ratio: float) -> CombinationalMaskGenerator:
        if ratio not in self._generators:
            hp = self.hparams
            with torch.device("cpu"):  # masks are drawn on the CPU, whatever the default device
                self._generators[ratio] = CombinationalMaskGenerator(self.model.grid, ratio, hp.min_mask_patches, hp.min_aspect)
        return self._generators[ratio]

    def mask_ratio(self, category: str | None) -> float:
        """Table 6 ratio of a category (source prefixes such as ``mvtec/`` are ignored), else the default."""
        if category is None:
            return float(self.hparams.default_mask_ratio)
        name = str(category).rsplit("/", 1)[-1]
        return float(self.mask_ratios.get(category, self.mask_ratios.get(name, self.hparams.default_mask_ratio)))

    def set_deploy_category(self, category: str | None) -> None:
        """Fix the image-only path's mask ratio to ``category``'s (``None``: infer each image's category).

        Use before ``Engine.export`` (without ``ckpt_path``, which would reload the checkpoint's
        arguments) to export a graph for one product, e.g.
        ``Pmad.load_from_checkpoint(ckpt, deploy_category="screw")``.
        """
        if category is not None and category not in self.mask_ratios and str(category).rsplit("/", 1)[-1] not in self.mask_ratios:
            msg = (
                f"deploy_category '{category}' has no mask ratio (known: {sorted(self.mask_ratios)}); "
                f"add it to mask_ratios, e.g. mask_ratios={{'{category}': {self.hparams.default_mask_ratio}}}"
            )
            raise ValueError(msg)
        self.hparams["deploy_category"] = category
        self.model.infer_category = category is None
        self.model.set_default_mask_ratio(self.mask_ratio(category))

    def _set_category_ratios(self, names: Sequence[str]) -> None:
        """Mask-count table of the image-only path, one entry per category index of the datamodule."""
        if names:
            self.model.set_category_mask_ratios([self.mask_ratio(name) for name in names])

    def _categories(self, batch: Batch) -> list[str | None]:
        names = getattr(batch, "category", None)
        size = batch.image.shape[0]
        if names is None or isinstance(names, str):
            return [names] * size
        return list(names)

    def _category_index(self, batch: Batch) -> torch.Tensor:
        index = getattr(batch, "category_index", None)
        if index is None:
            return torch.zeros(batch.image.shape[0], dtype=torch.long, device=batch.image.device)
        return torch.as_tensor(index, device=batch.image.device).long().reshape(-1)

    def _transform(self, images: torch.Tensor) -> torch.Tensor:
        transform = getattr(self.pre_processor, "transform", None)
        return transform(images) if transform is not None else images

    @torch.no_grad()
    def _collect_embeddings(self, loader: Any, sources: bool = False) -> tuple[torch.Tensor, ...]:  # noqa: ANN401
        """Patch rows (N, C) and category labels (N,) of every image; with ``sources`` also each row's image number (N,).

        With ``sources`` the image paths are remembered (``self._train_sources``: path -> number), so
        training batches can exclude their own image's prototypes (held-out residuals). The rows are
        written batch by batch into one tensor of the dataset's size (``collect_batches``), not
        listed and then concatenated (which held the training set's patches twice).
        """
        if sources:
            self._train_sources = {}
        count = 0

        def extract(batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            nonlocal count
            images = self._transform(batch.image.to(self.device))
            emb = self.model.protoflow.embed(images)
            ids = torch.arange(count, count + emb.shape[0])
            if sources:
                for path, number in zip(self._paths(batch), ids.tolist(), strict=True):
                    if path is not None:
                        self._train_sources[path] = number
            count += emb.shape[0]
            rows = emb.permute(0, 2, 3, 1).reshape(emb.shape[0], -1, emb.shape[1])  # (B, H * W, C)
            return rows.cpu(), self._category_index(batch).cpu(), ids

        collected = collect_batches(loader, extract)
        if not collected:
            msg = "PMAD got an empty training set: ProtoFlow's prototype pool needs normal training images"
            raise ValueError(msg)
        rows, labels, numbers = collected
        per = rows.shape[1]
        flat = rows.reshape(-1, rows.shape[-1])  # a view: images' rows in order
        if sources:
            return flat, labels.repeat_interleave(per), numbers.repeat_interleave(per)
        return flat, labels.repeat_interleave(per)

    @staticmethod
    def _paths(batch: Batch) -> list[str | None]:
        paths = getattr(batch, "image_path", None)
        size = batch.image.shape[0]
        if paths is None or isinstance(paths, str):
            return [paths] * size
        return [str(p) for p in paths]

    def _sources(self, batch: Batch) -> torch.Tensor:
        """Training-image number of each batch image (-1: unknown, nothing excluded)."""
        table = getattr(self, "_train_sources", None) or {}
        return torch.tensor([table.get(p, -1) if p is not None else -1 for p in self._paths(batch)], dtype=torch.long)

    def on_train_start(self) -> None:
        """Prototype pool from the whole training set (frozen backbone), before the first step."""
        super().on_train_start()
        datamodule = getattr(self.trainer, "datamodule", None)
        self._set_category_ratios(list(getattr(datamodule, "category_names", None) or []))
        count = int(getattr(datamodule, "num_train_categories", 1) or 1)
        for category in getattr(datamodule, "train_categories", None) or []:
            try:
                self._generator(self.mask_ratio(category))
            except ValueError as err:
                msg = f"Mask ratio {self.mask_ratio(category)} of category '{category}': {err}; set mask_ratios"
                raise ValueError(msg) from err
        if self.errors.errors.shape[0] != count:
            self.errors = PatchErrorRecorder(count, self.model.grid).to(self.device)
        if self.model.protoflow.is_fitted:
            return  # resumed from a checkpoint
        embeddings, labels, sources = self._collect_embeddings(full_training_loader(self.trainer), sources=True)
        prototypes, kept, kept_sources = self.model.protoflow.fit_prototypes(embeddings, labels, sources=sources)
        self.model.protoflow.set_prototypes(prototypes, kept, kept_sources)
        if self.model.uses_feature_codes and not self.model.tokenizer.is_fitted:
            self.model.fit_feature_codes(embeddings, seed=self.model.protoflow.seed)

    def _add_support_prototypes(self) -> None:
        """Prototypes of test categories without any, from the datamodule's k-shot support set."""
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if getattr(datamodule, "support_data", None) is None or not self.model.protoflow.is_fitted:
            return
        self._set_category_ratios(list(getattr(datamodule, "category_names", None) or []))
        embeddings, labels = self._collect_embeddings(datamodule.support_dataloader())
        present = set(self.model.protoflow.bank.labels.tolist())
        new = torch.tensor([int(v) not in present for v in labels.tolist()], dtype=torch.bool)
        if new.any():
            prototypes, kept = self.model.protoflow.fit_prototypes(embeddings[new], labels[new], self.hparams.support_coreset_ratio)
            self.model.protoflow.add_prototypes(prototypes, kept)

    def on_test_start(self) -> None:
        """Add support-set prototypes of unseen test categories (few-shot setting)."""
        super().on_test_start()
        self._add_support_prototypes()

    def on_predict_start(self) -> None:
        """Add support-set prototypes of unseen categories (few-shot setting)."""
        super().on_predict_start()
        self._add_support_prototypes()

    #: Checkpoint key of ProtoFlow's prototype sources (the training image of each prototype) and the
    #: training images' numbers: only training needs them (held-out residuals; a resumed fit must hold
    #: out the same prototypes), so they stay out of the state dict and the exports.
    SOURCES_KEY = "pmad_prototype_sources"

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Also keep the prototypes' source images, so a resumed fit holds the same residuals out."""
        super().on_save_checkpoint(checkpoint)
        sources = self.model.protoflow.prototype_sources
        if sources is not None:
            checkpoint[self.SOURCES_KEY] = {
                "prototypes": sources.detach().cpu(),
                "images": dict(getattr(self, "_train_sources", None) or {}),  # training image path -> number
            }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Size the per-category error recorder and mask-count table as in the checkpoint; restore prototype sources."""
        sources = checkpoint.get(self.SOURCES_KEY)
        if sources is not None:
            self.model.protoflow.prototype_sources = torch.as_tensor(sources["prototypes"]).long()
            self._train_sources = {str(k): int(v) for k, v in sources["images"].items()}
        state = checkpoint.get("state_dict", {})
        state.pop("model.default_mask_count", None)  # older checkpoints: now derived from the arguments
        counts = state.get("model.category_mask_counts")
        if counts is not None:
            self.model.category_mask_counts = torch.zeros_like(counts)
        stored = state.get("errors.errors")
        if stored is not None and stored.shape != self.errors.errors.shape:
            self.errors = PatchErrorRecorder(int(stored.shape[0]), self.model.grid)
        super().on_load_checkpoint(checkpoint)

    # ---------------------------------------------------------------- training
    def _training_masks(self, batch: Batch, images: torch.Tensor, embedding: torch.Tensor, dynamic: bool) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
        """Combinational masks (B, N) on the ViT grid and the dynamic weights used for each image."""
        grid = self.model.grid
        region = F.interpolate(foreground_mask(embedding).unsqueeze(1).float(), size=grid, mode="nearest")[:, 0].bool().cpu()
        unit = (images * self.model.tokenizer.std + self.model.tokenizer.mean).detach().cpu()
        index = self._category_index(batch).cpu()
        masks, used = [], []
        for b, category in enumerate(self._categories(batch)):
            weights = self.errors.weights(int(index[b])) if dynamic and int(index[b]) < self.errors.errors.shape[0] else None
            generator = self._generator(self.mask_ratio(category))
            masks.append(generator(self._mask_rng, region=region[b], image=unit[b], dynamic_weights=weights))
            used.append(weights)
        return torch.stack(masks).flatten(1).to(images.device), used

    def training_step(self, batch: Batch, *args: Any, **kwargs: Any) -> STEP_OUTPUT:  # noqa: ANN401
        """One MIM step (token cross-entropy at masked patches) and, while it trains, one ProtoFlow step."""
        del args, kwargs
        images = batch.image
        check_images(images, self.model.img_size, "PMAD", multiple=self.model.patch_size)
        model = self.model
        mim_opt, flow_opt = self.optimizers()
        mim_sched, flow_sched = self.lr_schedulers()
        size = images.shape[0]
        embedding = model.protoflow.embed(images)
        dynamic = self.current_epoch >= self.hparams.dynamic_start_epoch

        # masked image modelling
        mask, dyn_weights = self._training_masks(batch, images, embedding, dynamic)
        with torch.no_grad():
            targets = model.token_targets(images, embedding)
        logits = model.mim(images, mask, masked_only=True)
        token_ce = F.cross_entropy(logits.float(), targets[mask], reduction="none")
        if dynamic and all(w is not None for w in dyn_weights):
            weights = torch.cat([rank_loss_weights(w, m.cpu()) for w, m in zip(dyn_weights, mask, strict=True)]).to(token_ce)
            token_loss = (token_ce * weights).mean()
        else:
            token_loss = token_ce.mean()
        mim_opt.zero_grad()
        self.manual_backward(token_loss)
        self.clip_gradients(mim_opt, gradient_clip_val=self.hparams.gradient_clip_val, gradient_clip_algorithm="norm")
        mim_opt.step()
        mim_sched.step()
        per_patch = torch.zeros_like(mask, dtype=token_ce.dtype)
        per_patch[mask] = token_ce.detach()
        self.errors.update(gather_rows(self._category_index(batch)), gather_rows(mask), gather_rows(per_patch))

        # ProtoFlow
        if self.current_epoch < self.hparams.flow_epochs:
            residual = self._flow_residual(batch, images, embedding)
            nll = model.protoflow.nll(residual)
            flow_loss = model.protoflow.loss(nll)
            flow_opt.zero_grad()
            self.manual_backward(flow_loss)
            # through the strategy (precision plugins still apply) but not LightningOptimizer.step, so the
            # flow's step is not counted: global_step and max_steps count batches, as for the other models
            self.trainer.strategy.optimizer_step(flow_opt.optimizer, closure=lambda: None)
            flow_sched.step()
            nll = nll.detach()
        else:
            with torch.no_grad():
                nll = model.protoflow.nll(model.protoflow.residual(embedding))
            flow_loss = model.protoflow.loss(nll)
        # provisional likelihood reference (smallest NLL of the epoch's flow inputs so far), so a
        # validation inside training has one; with ``reference_quantile`` it is replaced by the
        # held-out quantile when the flow's training ends (_fit_reference)
        if self.hparams.get("reference_quantile") is None or not self._reference_fitted:
            reference = self.model.protoflow.reference_nll
            batch_min = reduce_min(nll.min().to(reference))
            reference.copy_(batch_min if self._new_epoch or not torch.isfinite(reference) else torch.minimum(reference, batch_min))
        self._new_epoch = False

        accuracy = (logits.argmax(-1) == targets[mask]).float().mean()
        self.log("train_token_loss", token_loss.detach(), on_step=True, on_epoch=True, prog_bar=True, batch_size=size)
        # unweighted cross-entropy: comparable across the switch to rank-weighted (dynamic) loss
        self.log("train_token_ce", token_ce.detach().mean(), on_step=True, on_epoch=True, batch_size=size)
        self.log("train_flow_loss", flow_loss.detach(), on_step=True, on_epoch=True, prog_bar=True, batch_size=size)
        self.log("train_token_accuracy", accuracy, on_step=True, on_epoch=False, batch_size=size)
        return {"loss": token_loss.detach() + flow_loss.detach()}

    def on_train_epoch_start(self) -> None:
        """The likelihood reference restarts with each epoch (the flow changed)."""
        self._new_epoch = True

    def _flow_residual(self, batch: Batch, images: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        """Residual features the flow trains on (eq. 7).

        ``flow_augment``: an augmented view of each image (RandomResizedCrop 0.2-1, flip; the
        authors' ProtoFlow training transform) instead of the image itself. ``flow_search="category"``:
        the nearest prototype of the image's own category (the authors' ``generate_prototype``).
        ``flow_holdout``: prototypes taken from the image itself are excluded, so no residual is
        the exact zero of a patch that is its own prototype (about 1 % of them with a 1 % coreset)
        and none is shrunk by a neighbouring patch of the same image: the residuals follow the
        distribution of unseen normal images'.
        """
        hp = self.hparams
        protoflow = self.model.protoflow
        if hp.get("flow_augment", False):
            embedding = protoflow.embed(augmented_views(images))
        category = self._category_index(batch) if hp.get("flow_search", "all") == "category" and self._searchable(batch) else None
        if hp.get("flow_holdout", False):
            return protoflow.heldout_residual(embedding, category, self._sources(batch))
        return protoflow.residual(embedding, category)

    def _searchable(self, batch: Batch) -> bool:
        """True when every image's category has prototypes (its own pool can be searched)."""
        if getattr(batch, "category_index", None) is None:
            return False
        present = set(self.model.protoflow.bank.labels.tolist())
        return all(int(i) in present for i in self._category_index(batch).tolist())

    @torch.no_grad()
    def _fit_reference(self) -> None:
        """ProtoFlow's likelihood reference from held-out residuals of the training images.

        Every training patch's residual to the nearest prototype of another image (its own
        category's pool, as at training), through the trained flow; the reference is the
        ``reference_quantile`` of those NLLs (0: their minimum, the analogue of the authors' most
        likely TEST patch, but on normal training images scored as if unseen).
        """
        protoflow = self.model.protoflow
        values = []
        # a measurement pass: the loader's base seed must not come out of the training's random stream
        # (an early-stopped run fits here too, and its checkpoint must resume as the uninterrupted run)
        with torch.random.fork_rng(devices=[]):
            for batch in full_training_loader(self.trainer):
                images = self._transform(batch.image.to(self.device))
                category = self._category_index(batch).to(self.device) if self.hparams.get("flow_search", "all") == "category" and self._searchable(batch) else None
                residual = protoflow.heldout_residual(protoflow.embed(images), category, self._sources(batch))
                values.append(protoflow.nll(residual).flatten().float().cpu())
        nll = torch.cat(values)
        q = float(self.hparams.reference_quantile)
        # torch.quantile is limited to 2**24 values; a strided subsample keeps larger sets exact enough
        step = max(1, nll.numel() // (1 << 24) + 1) if nll.numel() > (1 << 24) else 1
        value = nll.min() if q == 0.0 else torch.quantile(nll[::step], q)
        protoflow.reference_nll.copy_(value.to(protoflow.reference_nll))
        self._reference_fitted = True

    def on_train_batch_end(self, outputs: STEP_OUTPUT, batch: Any, batch_idx: int) -> None:  # noqa: ANN401
        """At the last batch of the flow's last epoch (or of the fit), fit the held-out reference.

        Here rather than at the epoch's end: Lightning validates before ``on_train_epoch_end``, and
        the image threshold that validation fits must come from the reference the model keeps.
        """
        super().on_train_batch_end(outputs, batch, batch_idx)
        trainer = self.trainer
        last_batch = math.isfinite(trainer.num_training_batches) and batch_idx + 1 >= int(trainer.num_training_batches)
        steps_done = trainer.max_steps is not None and trainer.max_steps >= 0 and trainer.global_step >= trainer.max_steps
        if last_batch or steps_done:
            self.on_train_epoch_end()

    def on_train_epoch_end(self) -> None:
        """After the flow's last training epoch (or the fit's last epoch), fit the held-out reference (once)."""
        if self.hparams.get("reference_quantile") is None or self._reference_fitted:
            return
        trainer = self.trainer
        last_flow = self.current_epoch + 1 >= self.hparams.flow_epochs
        max_epochs = trainer.max_epochs if trainer.max_epochs is not None and trainer.max_epochs >= 0 else None
        steps_done = trainer.max_steps is not None and trainer.max_steps >= 0 and trainer.global_step >= trainer.max_steps
        last_fit = (max_epochs is not None and self.current_epoch + 1 >= max_epochs) or steps_done or trainer.should_stop
        if last_flow or last_fit:
            self._fit_reference()

    def on_train_end(self) -> None:
        """Fit the held-out reference if training stopped before an epoch end that did (e.g. max_steps)."""
        super().on_train_end()
        if self.hparams.get("reference_quantile") is not None and not self._reference_fitted:
            self._fit_reference()

    def configure_optimizers(self) -> tuple[list[torch.optim.Optimizer], list[torch.optim.lr_scheduler.LRScheduler]]:
        """AdamW + warm-up/cosine for the MIM; Adam + warm-up/cosine for ProtoFlow's flow (Table 5)."""
        hp = self.hparams
        total = self.trainer.estimated_stepping_batches
        if total <= 0 or total == float("inf"):
            msg = "PMAD needs a finite training length: set trainer max_epochs (300 in the paper) or max_steps"
            raise ValueError(msg)
        total = int(total)
        per_epoch = max(1, int(self.trainer.num_training_batches)) if math.isfinite(self.trainer.num_training_batches) else total
        decay, no_decay = [], []
        for name, param in self.model.mim.named_parameters():
            if not param.requires_grad:
                continue
            skip = param.ndim == 1 or name.endswith(".bias") or name.split(".")[-1] in ("pos_embed", "cls_token")
            (no_decay if skip else decay).append(param)
        mim_opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": hp.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=hp.lr,
            betas=tuple(hp.betas),
        )
        warmup = min(hp.warmup_epochs * per_epoch, total - 1)
        mim_sched = WarmupCosineLR(mim_opt, total_iters=max(total, 1), warmup_iters=max(warmup, 0), final_lr=hp.min_lr) if total > 1 else torch.optim.lr_scheduler.LambdaLR(mim_opt, lambda _: 1.0)
        flow_opt = torch.optim.Adam(self.model.protoflow.flow.parameters(), lr=hp.flow_lr)
        flow_epochs, warm, final = max(hp.flow_epochs, 1), hp.flow_warmup_epochs, hp.flow_lr_decay**3

        def flow_factor(step: int) -> float:
            epoch = step / per_epoch
            cosine = final + (1 - final) * 0.5 * (1 + math.cos(math.pi * min(epoch, flow_epochs) / flow_epochs))
            if epoch < warm:  # linear warm-up from lr/10 to the cosine value at the end of warm-up (CFlow)
                target = final + (1 - final) * 0.5 * (1 + math.cos(math.pi * warm / flow_epochs))
                return 0.1 + (target - 0.1) * epoch / warm
            return cosine

        flow_sched = torch.optim.lr_scheduler.LambdaLR(flow_opt, flow_factor)
        return [mim_opt, flow_opt], [mim_sched, flow_sched]

    # --------------------------------------------------------------- inference
    def _mask_counts(self, batch: Batch) -> torch.Tensor | None:
        """Known categories' counts; ``None`` (image-only rule) for batches without categories."""
        categories = self._categories(batch)
        if any(c is None for c in categories):
            return None
        counts = [self.model.mask_count(self.mask_ratio(c)) for c in categories]
        return torch.tensor(counts, device=batch.image.device)

    def _search_category(self, batch: Batch) -> torch.Tensor | None:
        if self.hparams.prototype_search != "category" or getattr(batch, "category_index", None) is None:
            return None
        index = self._category_index(batch)
        present = set(self.model.protoflow.bank.labels.tolist())
        return index if all(int(i) in present for i in index.tolist()) else None

    def validation_step(self, batch: Batch, *args: Any, **kwargs: Any) -> STEP_OUTPUT:  # noqa: ANN401
        """Score each image alone at its category's mask ratio (Table 6) or the default."""
        del args, kwargs
        out = self.model(batch.image, mask_counts=self._mask_counts(batch), category=self._search_category(batch))
        return batch.update(pred_score=out.pred_score, anomaly_map=out.anomaly_map)
