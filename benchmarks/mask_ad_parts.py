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

from anomalib_mcad.models.components.sinkhorn import sinkhorn  # noqa: E402
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


def load_trained(path: str, dataset: str, synthetic_root: str):  # noqa: ANN201
    """A saved MaskAD Lightning module (eval mode) and the harness's datamodule, set up."""
    module = torch.load(path, weights_only=False, map_location="cpu")
    module.eval()
    dm = datamodule(dataset, None, 16, Path(synthetic_root), 256)
    dm.setup()
    return module, dm


@torch.no_grad()
def scores(model, feats):  # noqa: ANN001, ANN201
    parts = [model.patch_scores(f) for f in feats.split(16)]
    return {k: torch.cat([getattr(p, k) for p in parts]) for k in ("rec", "assdis", "refdis", "po", "combined")}


@torch.no_grad()
def legacy(model, feats):  # noqa: ANN001, ANN201
    """The previous scoring on the same reconstructions: Rec = mean squared error summed over channels,
    AssDis = per-patch N x N OT (epsilon 1) on |RMSE_h_i - RMSE_r_j|; and how uniform each OT plan is."""
    rec, assdis, dev_old, dev_new = [], [], [], []
    for f in feats.split(16):
        ref = model.reference(f)
        masks = model.test_masks(model.po_map(model.log_likelihood(f - ref)), f)
        b, c, hh, ww = f.shape
        n = masks.shape[1]
        x = torch.stack([f, ref], 1).unsqueeze(2).expand(-1, -1, n, -1, -1, -1).reshape(-1, c, hh, ww)
        m = masks.unsqueeze(1).expand(-1, 2, -1, -1, -1).reshape(-1, hh, ww)
        sq = (x - model.reconstruct(x, m)).pow(2).reshape(b, 2, n, c, hh, ww)
        rec.append(sq[:, 0].sum(2).mean(1))
        rmse = sq.mean(3).sqrt()
        e_h, e_r = rmse[:, 0].permute(0, 2, 3, 1), rmse[:, 1].permute(0, 2, 3, 1)
        cost = (e_h.unsqueeze(-1) - e_r.unsqueeze(-2)).abs()
        plan = sinkhorn(cost, 1.0, 50)
        assdis.append((plan * cost).sum((-1, -2)))
        dev_old.append((plan * n * n - 1).abs().mean((-1, -2)).flatten())  # 0 = uniform plan
        l2 = sq.sum(3).sqrt()
        ph, pr = l2[:, 0].flatten(2).transpose(1, 2), l2[:, 1].flatten(2).transpose(1, 2)
        cos = (1 - torch.nn.functional.cosine_similarity(ph.unsqueeze(2), pr.unsqueeze(1), dim=-1)).clamp_min(0)
        plan2 = sinkhorn(cos, model.sinkhorn_epsilon, model.sinkhorn_iterations)
        k = cos.shape[-1]
        dev_new.append((plan2 * k * k - 1).abs().mean((-1, -2)))
    return torch.cat(rec), torch.cat(assdis), torch.cat(dev_old), torch.cat(dev_new)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("path")
    p.add_argument("--dataset", default="elpv")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--synthetic-root", default=str(Path(tempfile.gettempdir()) / "mcad_synthetic_acc"))
    p.add_argument("--legacy", action="store_true", help="also the previous Rec/AssDis formulas on the same reconstructions")
    p.add_argument("--extra", action="store_true", help="also the one-mask-set, uniform-profile and no-zero-mask passes")
    args = p.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(2)
    t0 = time.time()
    module, dm = load_trained(args.path, args.dataset, args.synthetic_root)
    model = module.model
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
    if args.legacy:
        rec_sq, ad_old, dev_old, dev_new = legacy(model, h)
        print(f"previous scoring: Rec (sum of squares) median {rec_sq.median():.4g}, AssDis (RMSE, eps 1) median {ad_old.median():.4g}, ratio {float(ad_old.median() / rec_sq.median()):.2g}")
        print(f"OT plan deviation from uniform, mean |M * n^2 - 1|: previous (per patch, eps 1) {dev_old.median():.3g}; authors' (across patches, cosine, eps {model.sinkhorn_epsilon}) {dev_new.median():.3g}")
        show("previous: Rec + AssDis (no M_po, no blur)", (rec_sq + ad_old).flatten(1).amax(1), y, cats)
        show("previous: Rec alone (no blur)", rec_sq.flatten(1).amax(1), y, cats)
        show("previous: AssDis alone (no blur)", ad_old.flatten(1).amax(1), y, cats)
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
