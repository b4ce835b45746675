"""MaskAD score ablations on a saved module (``benchmarks/accuracy.py --save``), without retraining.

Reads every training and test image once through the module's own (antialiased) transform, then
scores the test set with several variants of the test-time scheme and prints per-category image
AUROC on raw scores. Used for issue 16 (accuracy on real features); see the model README.

Usage::

    python benchmarks/mask_ad_ablation.py /tmp/m.pt --dataset elpv
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from torch.nn import functional as F  # noqa: N812
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).parent))
from mask_ad_parts import load_trained, read, show  # noqa: E402

from anomalib_mcad.models.components.sinkhorn import sinkhorn  # noqa: E402


@torch.no_grad()
def main() -> None:  # noqa: PLR0915
    p = argparse.ArgumentParser()
    p.add_argument("path")
    p.add_argument("--dataset", default="elpv")
    p.add_argument("--synthetic-root", default=str(Path(tempfile.gettempdir()) / "mcad_synthetic_acc"))
    p.add_argument("--quick", action="store_true")
    args = p.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(2)
    t0 = time.time()
    module, dm = load_trained(args.path, args.dataset, args.synthetic_root)
    model = module.model
    collate = dm.train_data.collate_fn
    h_train, _, c_train = read(module, DataLoader(dm.train_data, batch_size=32, shuffle=False, collate_fn=collate))
    h_test, y, cats = read(module, DataLoader(dm.test_data, batch_size=32, shuffle=False, collate_fn=dm.test_data.collate_fn))
    print(f"features read in {time.time() - t0:.0f} s: train {tuple(h_train.shape)} test {tuple(h_test.shape)}", flush=True)
    B, C, H, W = h_test.shape

    # --- the module's own (current) scheme
    def chunks(x, n=32):  # noqa: ANN001, ANN202
        return x.split(n)

    parts = [model.patch_scores(h) for h in chunks(h_test)]
    old = {k: torch.cat([getattr(s, k) for s in parts]) for k in ("rec", "assdis", "po", "patch_score")}
    print("current scheme magnitudes: rec median %.4g, assdis median %.4g (ratio %.2g), po==1 share %.3f" % (
        old["rec"].median(), old["assdis"].median(), float(old["assdis"].median() / old["rec"].median()), float((old["po"] == 1).float().mean())))
    show("current: (rec+assdis)*po, max", old["patch_score"].flatten(1).amax(1), y, cats)
    show("current: rec alone", old["rec"].flatten(1).amax(1), y, cats)
    show("current: assdis alone", old["assdis"].flatten(1).amax(1), y, cats)
    show("current: rec+assdis (no po)", (old["rec"] + old["assdis"]).flatten(1).amax(1), y, cats)

    # --- reference: nearest coreset token (bank rebuilt from the antialiased training features)
    tokens = h_train.permute(0, 2, 3, 1).reshape(-1, C)
    names = sorted(set(c_train))
    tok_labels = torch.as_tensor([names.index(c) for c in c_train]).repeat_interleave(H * W)
    from anomalib_mcad.models.components.coreset import NearestNeighbourBank  # noqa: PLC0415

    bank = NearestNeighbourBank()
    bank.fit_per_category(tokens, tok_labels, module.hparams.coreset_ratio, seed=0)
    old_bank_delta = (model.bank.memory.shape, bank.memory.shape)
    print("bank (export transform) vs rebuilt (antialias):", old_bank_delta)

    def ref(h):  # noqa: ANN001, ANN202
        n, _, _ = bank.nearest(h.flatten(2).transpose(1, 2))
        return n.transpose(1, 2).reshape_as(h)

    r_test = torch.cat([ref(h) for h in chunks(h_test)])
    r_train = torch.cat([ref(h) for h in chunks(h_train)])
    nn_dist = (h_test - r_test).pow(2).sum(1).sqrt()
    show("(info) nearest-coreset distance (PatchCore-like)", nn_dist.flatten(1).amax(1), y, cats)

    # --- ProtoFlow on residuals h - r, log p per channel with log-det
    from anomalib_mcad.models.components.flow import ConditionalFlow  # noqa: PLC0415

    torch.manual_seed(0)
    flow = ConditionalFlow(C, n_coupling=8, clamp=1.9, condition_dim=128, hidden_ratio=2.0, permute_soft=True)
    opt = torch.optim.Adam(flow.parameters(), lr=2e-4)
    res_train = h_train - r_train
    steps = 150 if args.quick else 600
    g = torch.Generator().manual_seed(0)
    t1 = time.time()
    for _ in range(steps):
        idx = torch.randint(res_train.shape[0], (8,), generator=g)
        loss = flow.nll(res_train[idx]).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    flow.eval()
    print(f"protoflow trained {steps} steps in {time.time() - t1:.0f} s, last nll {float(loss):.3f}", flush=True)
    with torch.no_grad():
        logp_train = torch.cat([-flow.nll(x) for x in chunks(res_train)])
        logp_test = torch.cat([-flow.nll(x) for x in chunks(h_test - r_test)])
    for qname, top in (("max", logp_train.max()), ("q99.9", torch.quantile(logp_train.flatten(), 0.999)), ("median", logp_train.median())):
        po = (1 - torch.exp(logp_test - top)).clamp(0, 1)
        print(f"  M_po with train {qname}: test po median {po.median():.3f}, share>0.99 {(po > 0.99).float().mean():.3f}")
    po = (1 - torch.exp(logp_test - logp_train.max())).clamp(0, 1)
    show("protoflow M_po alone (train max)", po.flatten(1).amax(1), y, cats)
    show("protoflow -logp alone", (-logp_test).flatten(1).amax(1), y, cats)
    show("old flow |z| alone", torch.cat([model.flow.abnormality(h) for h in chunks(h_test)]).flatten(1).amax(1), y, cats)

    # --- authors' masks: 4 prototype (1, 5, 9, 13), 4 random (39), 4 block (29), drawn per image
    grid = (H, W)
    from anomalib_mcad.models.components.masking import BlockwiseMaskGenerator, RandomMaskGenerator  # noqa: PLC0415

    rgen, bgen = RandomMaskGenerator(grid, 0.2), BlockwiseMaskGenerator(grid, 0.15, min_patches=4, min_aspect=0.3)
    counts = [int(H * W * r) for r in (0.01, 0.03, 0.05, 0.07)]
    from anomalib_mcad.models.image.mask_ad.torch_model import prototype_oriented_masks  # noqa: PLC0415

    def masks_for(rank, per_image, seed=0):  # noqa: ANN001, ANN202
        proto = prototype_oriented_masks(rank, counts)
        rng = torch.Generator().manual_seed(seed)
        if per_image:
            other = torch.stack([torch.stack([rgen(rng) for _ in range(4)] + [bgen(rng) for _ in range(4)]) for _ in range(rank.shape[0])])
        else:
            other = torch.stack([rgen(rng) for _ in range(4)] + [bgen(rng) for _ in range(4)]).unsqueeze(0).expand(rank.shape[0], -1, -1, -1)
        return torch.cat([proto, other], 1)

    @torch.no_grad()
    def errors(h, r, masks):  # noqa: ANN001, ANN202
        """Squared error summed over channels (b, 2, N, H, W) for h and r under the same masks."""
        b, n = masks.shape[:2]
        x = torch.stack([h, r], 1).unsqueeze(2).expand(-1, -1, n, -1, -1, -1).reshape(-1, C, H, W)
        m = masks.unsqueeze(1).expand(-1, 2, -1, -1, -1).reshape(-1, H, W)
        out = model.reconstruct(x, m)
        return (x - out).pow(2).sum(1).reshape(b, 2, n, H, W)

    blur = None
    from anomalib.models.components import GaussianBlur2d  # noqa: PLC0415

    blur = GaussianBlur2d(sigma=7.0, channels=1, kernel_size=2 * int(4.0 * 7 + 0.5) + 1)

    def image_score(patch, po_map=None, smooth=True):  # noqa: ANN001, ANN202
        up = F.interpolate(patch.unsqueeze(1), size=(224, 224), mode="bilinear", align_corners=True)
        if po_map is not None:
            up = up * F.interpolate(po_map.unsqueeze(1), size=(224, 224), mode="bilinear", align_corners=True)
        if smooth:
            up = torch.cat([blur(u) for u in up.split(64)])
        return up.flatten(1).amax(1)

    def ot_scores(sq, eps, iters):  # noqa: ANN001, ANN202
        l2 = sq.sqrt()  # (b, 2, N, H, W)
        ph = l2[:, 0].flatten(2).transpose(1, 2)  # (b, HW, N)
        pr = l2[:, 1].flatten(2).transpose(1, 2)
        cost = 1 - F.cosine_similarity(ph.unsqueeze(2), pr.unsqueeze(1), dim=-1, eps=1e-8)  # (b, HW, HW)
        plan = sinkhorn(cost, eps, iters)
        ot = (plan * cost).sum(-1) * 1e4
        return ot.reshape(-1, H, W), l2[:, 0].mean(1), cost

    rank = po  # M_po ranks patches for the prototype masks (higher = more abnormal)
    for per_image in (False, True):
        t2 = time.time()
        sq = torch.cat([errors(h, r, masks_for(k, per_image, seed=i)) for i, (h, r, k) in enumerate(zip(chunks(h_test), chunks(r_test), chunks(rank), strict=True))])
        ot, rec, cost = zip(*[ot_scores(s, 0.1, 100) for s in sq.split(32)], strict=True)
        ot, rec = torch.cat(ot), torch.cat(rec)
        tag = "per-image masks" if per_image else "fixed masks"
        print(f"[{tag}] scored in {time.time() - t2:.0f} s; OT median {ot.median():.4g}, mean-L2 median {rec.median():.4g}, cost median {torch.cat(cost).median():.4g}", flush=True)
        show(f"[{tag}] OT alone, blur", image_score(ot), y, cats)
        show(f"[{tag}] meanL2 alone, blur", image_score(rec), y, cats)
        show(f"[{tag}] 0.6 OT + 0.4 L2, blur", image_score(0.6 * ot + 0.4 * rec), y, cats)
        show(f"[{tag}] (0.6 OT + 0.4 L2) * po, blur (authors)", image_score(0.6 * ot + 0.4 * rec, po), y, cats)
        show(f"[{tag}] (0.6 OT + 0.4 L2) * po, no blur", image_score(0.6 * ot + 0.4 * rec, po, smooth=False), y, cats)
        show(f"[{tag}] OT * po, blur", image_score(ot, po), y, cats)
        show(f"[{tag}] L2 * po, blur", image_score(rec, po), y, cats)
        if not per_image:
            for eps in (1.0, 0.01):
                o2, _, _ = zip(*[ot_scores(s, eps, 100) for s in sq.split(32)], strict=True)
                show(f"[{tag}] OT alone eps {eps}, blur", image_score(torch.cat(o2)), y, cats)
    print(f"total {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
