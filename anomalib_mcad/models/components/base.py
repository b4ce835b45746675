"""Base class of the plugin's anomalib modules."""

from __future__ import annotations

from anomalib.models.components import AnomalibModule
from lightning.pytorch import Callback


class McadModule(AnomalibModule):
    """An :class:`~anomalib.models.components.AnomalibModule` with the plugin's shared behaviour.

    * anomalib's ``get_model("dinomaly")`` searches the *direct* subclasses of ``AnomalibModule``
      by class name. Our models derive from this intermediate class instead, so importing the
      plugin never changes which class anomalib's lookup returns (it only lists
      ``mcad_module``, which is abstract).
    * ``test`` prints and saves the per-category table
      (:class:`~anomalib_mcad.metrics.PerCategoryMetrics`) unless ``per_category_metrics=False``.
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
