"""Base class of the plugin's anomalib modules."""

from __future__ import annotations

from typing import Any

from anomalib import LearningType
from anomalib.data import Batch
from anomalib.models.components import AnomalibModule
from lightning.pytorch import Callback
from lightning.pytorch.utilities.types import STEP_OUTPUT
from torch import nn


class McadModule(AnomalibModule):
    """An :class:`~anomalib.models.components.AnomalibModule` with the plugin's shared behaviour.

    * anomalib's ``get_model("dinomaly")`` searches the *direct* subclasses of ``AnomalibModule``
      by class name. Our models derive from this intermediate class instead, so importing the
      plugin never changes which class anomalib's lookup returns (it only lists
      ``mcad_module``, which is abstract).
    * ``test`` prints and saves the per-category table
      (:class:`~anomalib_mcad.metrics.PerCategoryMetrics`) unless ``per_category_metrics=False``.
    * What every model of ours does alike: validation scores the images alone (no labels),
      trainer arguments (gradient clipping from the ``gradient_clip_val`` hyperparameter, no
      sanity validation; the training length is the user's) and the one-class learning type.
    """

    per_category_metrics: bool = True

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

    @property
    def trainer_arguments(self) -> dict[str, Any]:
        """Gradient clipping as the authors (``gradient_clip_val`` hyperparameter); no sanity validation."""
        return {"gradient_clip_val": self.hparams.get("gradient_clip_val"), "num_sanity_val_steps": 0}

    @property
    def learning_type(self) -> LearningType:
        """Unsupervised (one-class): trained on normal images only; category labels are not anomaly labels."""
        return LearningType.ONE_CLASS
