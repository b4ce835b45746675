"""MINT-AD ablations on cached frozen-backbone features (fast loop for accuracy work, issue 16).

The backbone is frozen and training has no image augmentation, so the Lite0 features ``f'`` of every
training and test image are computed once and cached; the trainable part (adapter, prompt mapper, INR,
distribution decoder, transformer) is then trained with the same optimiser, schedule and gradient
clipping as the Lightning module (AdamW, x0.1 after 80 % of the steps, clip-norm). Jitter and dropout
are applied after the features, exactly as in the model. Prints per-category image AUROC of several
image scores, the class accuracy on the test set and on the training set, and diagnostics
(adapter rms, logit spread, per-loss gradient norms on the adapter and the head at initialisation).

    python benchmarks/mint_ad_cached.py --dataset elpv --steps 600 --set lr=1e-3 num_decoder_layers=2
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from sklearn.metrics import roc_auc_score
from torch.nn import functional as F  # noqa: N812

sys.path.insert(0, str(Path(__file__).parent))
from accuracy import LITE0, datamodule  # noqa: E402

from anomalib_mcad.models.components.pre_processing import resize_crop_normalize  # noqa: E402
from anomalib_mcad.models.image.mint_ad import MintAdModel  # noqa: E402
from anomalib_mcad.models.image.mint_ad.loss import MintAdLoss  # noqa: E402

MODEL_KEYS = {"hidden_dim", "num_heads", "ffn_dim", "dropout", "num_encoder_layers", "num_decoder_layers", "token_dim", "jitter_scale", "jitter_prob", "prompt_type", "feature_size", "stages"}


def cache(dataset: str, image_size: int, feature_size: int, path: Path) -> dict:
    """Features, labels and categories of the train and test splits (computed once)."""
    if path.exists():
        return torch.load(path)
    dm = datamodule(dataset, None, 16, Path("/tmp/mcad_synthetic_acc"), 256)
    dm.setup()
    pre = resize_crop_normalize((image_size, image_size))
    net = MintAdModel(backbone="efficientnet_lite0", pretrained=LITE0, num_classes=2, feature_size=feature_size).eval()
    out = {}
    for split, loader in (("train", dm.train_dataloader()), ("test", dm.test_dataloader())):
        feats, labels, cats = [], [], []
        with torch.no_grad():
            for batch in loader:
                feats.append(net.original_features(pre(batch.image)))
                labels.append(torch.as_tensor(batch.gt_label).int())
                cats.append(torch.as_tensor(batch.category_index).long())
        out[split] = (torch.cat(feats), torch.cat(labels), torch.cat(cats))
    out["names"] = list(dm.category_names) if hasattr(dm, "category_names") else None
    torch.save(out, path)
    return out


def image_scores(original: torch.Tensor, reconstructed: torch.Tensor, image_size: int) -> dict[str, np.ndarray]:
    """Image scores from the squared-L2 map (paper) and UniAD's L2 map + avg-pool(16) + max."""
    sq = (original - reconstructed).pow(2).sum(1, keepdim=True)
    l2 = sq.sqrt()
    up = lambda m: F.interpolate(m, size=(image_size, image_size), mode="bilinear", align_corners=True)  # noqa: E731
    k = max(image_size // original.shape[-1], 1)
    return {
        "sqmax": up(sq).flatten(1).amax(1).numpy(),
        "l2pool": F.avg_pool2d(up(l2), k, stride=1).flatten(1).amax(1).numpy(),
        "sqpool": F.avg_pool2d(up(sq), k, stride=1).flatten(1).amax(1).numpy(),
        "gridmax": sq.flatten(1).amax(1).numpy(),
        "mean": sq.flatten(1).mean(1).numpy(),
    }


def grad_norms(net: MintAdModel, loss_fn: MintAdLoss, feats: torch.Tensor, cats: torch.Tensor) -> str:
    """Gradient norm of each loss term on the adapter and on the whole prompt mapper."""
    out = net.reconstruct_features(feats, cats)
    terms = loss_fn(out.original, out.reconstructed, out.adapted, out.prior_mean, out.prior_var, out.logits, cats)
    parts = []
    for name, weight in (("mse", 1.0), ("ce", loss_fn.ce_weight), ("prior", loss_fn.prior_weight)):
        net.zero_grad()
        (weight * terms[name]).backward(retain_graph=True)
        g_ad = net.adapter.weight.grad.norm().item() if net.adapter.weight.grad is not None else 0.0
        g_pm = sum((p.grad.norm() ** 2).item() for p in net.prompt_mapper.parameters() if p.grad is not None) ** 0.5
        parts.append(f"{name}(w) adapter {g_ad:.3g} mapper {g_pm:.3g}")
    net.zero_grad()
    spread = (out.logits.max(1).values - out.logits.min(1).values).mean().item() if out.logits is not None else 0.0
    return "; ".join(parts) + f"; logit spread {spread:.4f}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dataset", default="elpv")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", nargs="*", default=[])
    parser.add_argument("--eval-every", type=int, default=0)
    parser.add_argument("--save", default=None)
    args = parser.parse_args()
    torch.set_num_threads(int(__import__("os").environ.get("MINT_THREADS", "2")))
    sets = {k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in args.set)}
    fs = int(sets.get("feature_size", args.image_size // 16))
    data = cache(args.dataset, args.image_size, fs, Path(f"/tmp/mint/{args.dataset}_{args.image_size}_{fs}.pt"))
    xtr, _, ctr = data["train"]
    xte, yte, cte = data["test"]
    n_cls = int(ctr.max()) + 1
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    model_kw = {k: v for k, v in sets.items() if k in MODEL_KEYS or k in MintAdModel.__init__.__code__.co_varnames}
    model_kw = {k: v for k, v in model_kw.items() if k not in ("lr", "weight_decay", "ce_weight", "prior_weight", "gradient_clip_val", "lr_drop_at")}
    net = MintAdModel(backbone="efficientnet_lite0", pretrained=False, num_classes=n_cls, feature_size=fs, **model_kw)
    net.backbone = torch.nn.Identity()  # features are cached
    loss_kw = {k: sets[k] for k in ("ce_weight", "prior_weight", "prior_detach") if k in sets}
    loss_fn = MintAdLoss(**loss_kw)
    lr = float(sets.get("lr", 1e-3))
    clip = float(sets.get("gradient_clip_val", 0.1))
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=float(sets.get("weight_decay", 1e-4)))
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[max(int(args.steps * float(sets.get("lr_drop_at", 0.8))), 1)], gamma=0.1)
    net.train()
    idx = torch.randperm(len(xtr))[: args.batch]
    print("init:", grad_norms(net, loss_fn, xtr[idx], ctr[idx]), flush=True)
    start = time.perf_counter()
    perm, pos, hist = torch.randperm(len(xtr)), 0, []
    for step in range(1, args.steps + 1):
        if pos + args.batch > len(xtr):
            perm, pos = torch.randperm(len(xtr)), 0
        b = perm[pos : pos + args.batch]
        pos += args.batch
        out = net.reconstruct_features(xtr[b], ctr[b])
        terms = loss_fn(out.original, out.reconstructed, out.adapted, out.prior_mean, out.prior_var, out.logits, ctr[b])
        opt.zero_grad()
        terms["loss"].backward()
        gn = torch.nn.utils.clip_grad_norm_(params, clip) if clip > 0 else torch.tensor(0.0)
        opt.step()
        sched.step()
        hist.append([terms[k].item() for k in ("mse", "ce", "prior")] + [gn.item(), out.adapted.pow(2).mean().sqrt().item()])
        if step % 100 == 0 or step == 1:
            h = np.mean(hist[-20:], 0)
            print(f"step {step} mse {h[0]:.4f} ce {h[1]:.4f} prior {h[2]:.3f} gradnorm {h[3]:.3g} adapter_rms {h[4]:.3f} [{time.perf_counter() - start:.0f}s]", flush=True)
        if args.eval_every and step % args.eval_every == 0 and step < args.steps:
            evaluate(net, xte, yte, cte, xtr, ctr, args.image_size, n_cls, f"@{step}")
            net.train()
    evaluate(net, xte, yte, cte, xtr, ctr, args.image_size, n_cls, "final", sets=args.set, seconds=time.perf_counter() - start)
    if args.save:
        torch.save(net, args.save)


def evaluate(net, xte, yte, cte, xtr, ctr, image_size, n_cls, tag, sets=(), seconds=0.0) -> None:  # noqa: ANN001, PLR0913
    net.eval()
    recs, preds = [], []
    with torch.no_grad():
        for i in range(0, len(xte), 64):
            out = net.reconstruct_features(xte[i : i + 64])
            recs.append(out.reconstructed)
            preds.append(out.logits.argmax(1) if out.logits is not None else torch.zeros(len(out.reconstructed), dtype=torch.long))
        tr_pred = torch.cat([net.reconstruct_features(xtr[i : i + 64]).logits.argmax(1) for i in range(0, len(xtr), 64)]) if net.prompt_mapper.head is not None else ctr
    rec, pred = torch.cat(recs), torch.cat(preds)
    scores = image_scores(xte, rec, image_size)
    acc_test = (pred == cte).float().mean().item()
    acc_train = (tr_pred == ctr).float().mean().item()
    line = []
    for name, s in scores.items():
        au = [roc_auc_score(yte[cte == c].numpy(), s[(cte == c).numpy()]) for c in range(n_cls)]
        line.append(f"{name} " + "/".join(f"{a:.3f}" for a in au) + f" mean {np.mean(au):.4f}")
    print(f"EVAL {tag} {' '.join(sets)} | cls acc test {acc_test:.3f} train {acc_train:.3f} | " + " | ".join(line) + f" [{seconds:.0f}s]", flush=True)


if __name__ == "__main__":
    main()
