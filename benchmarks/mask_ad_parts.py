"""Image AUROC of each part of MaskAD's score (alone and combined) on a saved module, without retraining.

``benchmarks/accuracy.py --model mask_ad ... --save m.pt`` first; then::

    python benchmarks/mask_ad_parts.py m.pt --dataset elpv

One pass of the test-time scheme gives Rec (mean L2), AssDis (OT), M_po and their combinations,
with and without the blur; further passes score with one shared mask set for every image
(``mask_banks`` 1), against the uniform profile instead of the reference, and without the
zero-mask. Per-category image AUROC on raw scores, then the mean.
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
from sklearn.metrics import roc_auc_score
from torch.nn import functional as F  # noqa: N812
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).parent))
from accuracy import datamodule  # noqa: E402

from anomalib_mcad.models.image.mask_ad.torch_model import gaussian_blur  # noqa: E402


@torch.no_grad()
def read(module, loader):  # noqa: ANN001, ANN201
    """Standardised features of every image (the module's own antialiased transform), labels, categories."""
    feats, labels, cats = [], [], []
    for batch in loader:
        feats.append(module.model.features(module.pre_processor.transform(batch.image)))
        labels.append(torch.as_tensor(batch.gt_label).reshape(-1).long())
        cats += list(batch.category)
    return torch.cat(feats), torch.cat(labels), np.array(cats)


def show(name: str, scores: torch.Tensor, labels: torch.Tensor, cats: np.ndarray) -> float:
    s, y = scores.float().numpy(), labels.numpy()
    r = {c: roc_auc_score(y[cats == c], s[cats == c]) for c in sorted(set(cats))}
    mean = float(np.mean(list(r.values())))
    print(f"{name:<40s} " + "  ".join(f"{k.split('/')[-1]} {v:.3f}" for k, v in r.items()) + f"  mean {mean:.4f}", flush=True)
    return mean


@torch.no_grad()
def scores(model, feats):  # noqa: ANN001, ANN201
    parts = [model.patch_scores(f) for f in feats.split(16)]
    return {k: torch.cat([getattr(p, k) for p in parts]) for k in ("rec", "assdis", "refdis", "po", "combined")}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("path")
    p.add_argument("--dataset", default="elpv")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--synthetic-root", default=str(Path(tempfile.gettempdir()) / "mcad_synthetic_acc"))
    p.add_argument("--extra", action="store_true", help="also the one-mask-set, uniform-profile and no-zero-mask passes")
    args = p.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(2)
    t0 = time.time()
    module = torch.load(args.path, weights_only=False, map_location="cpu")
    module.eval()
    model = module.model
    dm = datamodule(args.dataset, None, 16, Path(args.synthetic_root), 256)
    dm.setup()
    h, y, cats = read(module, DataLoader(dm.test_data, batch_size=32, shuffle=False, collate_fn=dm.test_data.collate_fn))
    size = (args.image_size, args.image_size)
    sigma = model.blur_sigma * size[0] / 224.0

    def image(patch: torch.Tensor, po: torch.Tensor | None = None, blur: bool = True) -> torch.Tensor:
        up = F.interpolate(patch.unsqueeze(1), size=size, mode="bilinear", align_corners=True)
        if po is not None:
            up = up * F.interpolate(po.unsqueeze(1), size=size, mode="bilinear", align_corners=True)
        if blur:
            up = torch.cat([gaussian_blur(u, sigma) for u in up.split(64)])
        return up.flatten(1).amax(1)

    s = scores(model, h)
    w = model.ot_weight
    print(f"features read and scored in {time.time() - t0:.0f} s; medians: Rec {s['rec'].median():.4g}, AssDis {s['assdis'].median():.4g}, M_po {s['po'].median():.3f} (share > 0.99: {(s['po'] > 0.99).float().mean():.3f})", flush=True)
    show("full: (0.6 AssDis + 0.4 Rec) x M_po, blur", image(s["combined"], s["po"]), y, cats)
    show("full without blur", image(s["combined"], s["po"], blur=False), y, cats)
    show("0.6 AssDis + 0.4 Rec (no M_po)", image(s["combined"]), y, cats)
    show("Rec alone", image(s["rec"]), y, cats)
    show("AssDis alone", image(s["assdis"]), y, cats)
    show("M_po alone", image(s["po"]), y, cats)
    show("Rec x M_po", image(s["rec"], s["po"]), y, cats)
    show("AssDis x M_po", image(s["assdis"], s["po"]), y, cats)
    show("AssDis + Rec equal weights x M_po", image(0.5 * s["assdis"] + 0.5 * s["rec"], s["po"]), y, cats)
    if args.extra:
        fixed = model.fixed_masks
        model.fixed_masks = fixed[:1]
        one = scores(model, h)
        show("one mask set for every image", image(one["combined"], one["po"]), y, cats)
        model.fixed_masks = fixed
        model.use_reference = False
        uni = scores(model, h)
        show("uniform profile instead of reference", image(uni["combined"], uni["po"]), y, cats)
        model.use_reference = True
        if bool((fixed[:, -1] == 0).all()):
            model.fixed_masks = fixed[:, :-1]
            nz = scores(model, h)
            show("without the zero-mask (N = 3n)", image(nz["combined"], nz["po"]), y, cats)
            model.fixed_masks = fixed
    del w
    print(f"total {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
