"""Image AUROC of each part of PMAD's score, alone and combined, on a saved module (no retraining).

``benchmarks/accuracy.py --model pmad ... --save m.pt`` first; then::

    python benchmarks/pmad_parts.py m.pt --dataset elpv

One pass over the test set (image-only path: prototypes of every category searched, the inferred
category's mask ratio) gives, per patch: ProtoFlow's weight ``1 - exp(-(nll - ref))``, its NLL,
the residual norm to the nearest prototype, and the token cross-entropy (at the proposal-masked
patches, and at every patch); image score = maximum of the upsampled, blurred map, as the model
does. Per-category image AUROC on raw scores, then the mean.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F  # noqa: N812
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).parent))
from accuracy import datamodule  # noqa: E402
from mask_ad_parts import show  # noqa: E402


@torch.no_grad()
def parts(module, loader) -> tuple[dict[str, torch.Tensor], torch.Tensor, np.ndarray]:  # noqa: ANN001
    """Per-patch score parts of every test image, its label and category."""
    model, flow = module.model, module.model.protoflow
    out: dict[str, list[torch.Tensor]] = {k: [] for k in ("weight", "nll", "residual", "ce_masked", "ce_all", "module")}
    labels, cats = [], []
    for batch in loader:
        x = module.pre_processor.transform(batch.image)
        embedding = flow.embed(x)
        residual, nearest = flow.residual_and_labels(embedding)
        nll = flow.nll(residual)
        mask = model.proposal_mask(nll, model.image_mask_counts(nearest))
        ce = model.token_errors(x, mask, embedding)
        grid = (x.shape[0], *model.grid)
        out["weight"].append(flow.abnormality(nll))
        out["nll"].append(nll)
        out["residual"].append(residual.pow(2).sum(1).sqrt())
        out["ce_masked"].append((ce * mask).reshape(grid))
        out["ce_all"].append(ce.reshape(grid))
        out["module"].append(model(x).pred_score)
        labels.append(torch.as_tensor(batch.gt_label).reshape(-1).long())
        cats += list(batch.category)
    return {k: torch.cat(v) for k, v in out.items()}, torch.cat(labels), np.array(cats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("path")
    parser.add_argument("--dataset", default="elpv", choices=["elpv", "synthetic"])
    parser.add_argument("--synthetic-root", default=str(Path(tempfile.gettempdir()) / "mcad_synthetic_acc"))
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(2)
    start = time.time()
    module = torch.load(args.path, weights_only=False, map_location="cpu")
    module.eval()
    dm = datamodule(args.dataset, None, 16, Path(args.synthetic_root), 256)
    dm.setup()
    loader = DataLoader(dm.test_data, batch_size=32, shuffle=False, collate_fn=dm.test_data.collate_fn)
    s, y, cats = parts(module, loader)
    model = module.model
    size = (model.img_size, model.img_size)

    def image(patch: torch.Tensor) -> torch.Tensor:
        up = F.interpolate(patch.unsqueeze(1), size=size, mode="bilinear", align_corners=True)
        return model.blur(up).flatten(1).amax(1)

    flow_grid = s["weight"].shape[-2:]
    ce = F.interpolate(s["ce_masked"].unsqueeze(1), size=flow_grid, mode="bilinear", align_corners=True).squeeze(1)
    print(f"scored in {time.time() - start:.0f} s; weight median {s['weight'].median():.3f}, share > 0.99: {(s['weight'] > 0.99).float().mean():.4f}")
    show("full (the module's score)", s["module"], y, cats)
    show("ProtoFlow weight alone", image(s["weight"]), y, cats)
    show("ProtoFlow NLL alone", image(s["nll"]), y, cats)
    show("residual norm alone", image(s["residual"]), y, cats)
    show("token CE alone (proposal-masked)", image(s["ce_masked"]), y, cats)
    show("token CE alone (every patch)", image(s["ce_all"]), y, cats)
    show("token CE x weight (their product)", image(ce * s["weight"]), y, cats)
    show("residual norm x weight", image(s["residual"] * s["weight"]), y, cats)


if __name__ == "__main__":
    main()
