"""``anomalib-mcad``: the plugin's own commands (demo, dataset generation, model list, comparison).

Training, testing and export go through anomalib's CLI with our class paths, e.g.
``anomalib train --model anomalib_mcad.Dinomaly --data anomalib_mcad.data.MultiClassDataModule``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    """Sub-commands: ``demo``, ``synth``, ``models``, ``compare``."""
    parser = argparse.ArgumentParser(
        prog="anomalib-mcad",
        description="The plugin's own commands: demo, dataset generation, model list, comparison. Training, testing and "
        "export go through anomalib's CLI with our class paths (anomalib train --model anomalib_mcad.Dinomaly ...).",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser(
        "demo",
        help="train, test, export and deploy a small Dinomaly on offline synthetic data (--job elpv: one of our CNN models vs "
        "anomalib's PatchCore on real ELPV solar-cell defects)",
        description="Default job 'dinomaly': a small random-weight Dinomaly on the synthetic set, trained, tested, exported to "
        "OpenVINO (shows the pipeline, not accuracy). Job 'elpv': train our CNN model once on both ELPV cell types and PatchCore "
        "per cell type on pretrained EfficientNet-Lite0 features, print the image-AUROC table, save anomaly maps, export to OpenVINO.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    demo.add_argument("--job", choices=["dinomaly", "elpv"], default="dinomaly", help="which demo to run")
    demo.add_argument("--output-dir", type=Path, default=Path("demo_output"), help="folder for the data, report, figures and exports")
    demo.add_argument("--model", default=None, help="elpv job: our model (mask_ad, pmad, mint_ad); default: the best one")
    demo.add_argument("--steps", type=int, default=120, help="dinomaly job: training iterations")
    demo.add_argument("--encoder", default="vit_small_patch14_reg4_dinov2", help="dinomaly job: timm ViT name (random weights)")
    demo.add_argument("--image-size", type=int, default=128, help="dinomaly job: resize side in pixels")
    demo.add_argument("--crop-size", type=int, default=112, help="dinomaly job: centre crop side in pixels")
    demo.add_argument("--batch-size", type=int, default=8, help="dinomaly job: training batch size")

    sub.add_parser(
        "synth",
        help="write the offline synthetic MVTec-layout dataset (options: see python -m anomalib_mcad.data.synthetic -h)",
        add_help=False,
    )

    sub.add_parser("models", help="list the plugin's models")

    sub.add_parser(
        "compare",
        help="train and test several models (ours and anomalib's) on the same data and seed, write one report "
        "(anomalib-mcad compare --config configs/compare/synthetic_cpu.yaml; options: anomalib-mcad compare -h)",
        add_help=False,
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``anomalib-mcad`` console script."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] in (["synth"], ["compare"]):  # their own parsers read every option after the name
        args, rest = argparse.Namespace(command=argv[0]), argv[1:]
    else:
        args, rest = parser.parse_known_args(argv)
    if args.command == "synth":
        from anomalib_mcad.data import synthetic  # noqa: PLC0415

        return synthetic.main(rest, prog="anomalib-mcad synth")
    if args.command == "compare":
        from anomalib_mcad import compare  # noqa: PLC0415

        return compare.main(rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.command == "demo":
        from anomalib_mcad import demo as demos  # noqa: PLC0415

        if args.job == "elpv":
            demos.run_elpv_demo(demos.ElpvDemoSettings(output_dir=args.output_dir, model=args.model or demos.ELPV_DEFAULT_MODEL))
            return 0
        demos.run_demo(
            demos.DemoSettings(
                output_dir=args.output_dir,
                steps=args.steps,
                encoder_name=args.encoder,
                image_size=args.image_size,
                crop_size=args.crop_size,
                batch_size=args.batch_size,
            ),
        )
        return 0
    from anomalib_mcad.models import list_models  # noqa: PLC0415

    print("\n".join(list_models()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
