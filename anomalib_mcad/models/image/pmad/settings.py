"""PMAD's cross-class and few-shot settings on MVTec-AD as anomalib CLI configs (``configs/pmad/``).

The files are generated, so the 15 leave-one-out splits (Table 7) and the few-shot grid
(Table 8's k = 1, 5, 10, 20, 50 on both cross-class splits) cannot drift apart by hand edits::

    python -m anomalib_mcad.models.image.pmad.settings configs/pmad

writes ``cross_class/leave_out_<category>.yaml`` (train on the other 14 categories, test on
the held-out one), ``cross_class/{objects_to_textures,textures_to_objects}.yaml`` (the authors'
``--from_obj_to_texture`` split and its reverse) and ``few_shot/<split>_k<k>.yaml``. A test
regenerates them and compares with the files on disk.

Prototypes of unseen categories come from ``support_shots`` normal training images each
(``MultiClassDataModule``'s support set, added to ProtoFlow's pool at test start). The authors'
``generate_prototypes.py`` builds them from *all* training images of every category; the
leave-one-out and split configs use k = 50 (the largest k of Table 8, available in every
MVTec-AD category: toothbrush has 60), the few-shot configs each k of Table 8.
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path
from typing import Any

import yaml

#: MVTec-AD categories in anomalib's order, and the two groups of the authors' cross-class split.
MVTEC_CATEGORIES: tuple[str, ...] = (
    "bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather", "metal_nut",
    "pill", "screw", "tile", "toothbrush", "transistor", "wood", "zipper",
)  # fmt: skip
MVTEC_TEXTURES: tuple[str, ...] = ("carpet", "grid", "leather", "tile", "wood")
MVTEC_OBJECTS: tuple[str, ...] = tuple(c for c in MVTEC_CATEGORIES if c not in MVTEC_TEXTURES)
#: Table 8's numbers of normal support images of each unseen category.
SHOTS: tuple[int, ...] = (1, 5, 10, 20, 50)
#: Support images per unseen category in the leave-one-out and split configs.
CROSS_CLASS_SHOTS = 50
#: The two cross-class splits: name -> (training categories, test categories).
SPLITS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "objects_to_textures": (MVTEC_OBJECTS, MVTEC_TEXTURES),
    "textures_to_objects": (MVTEC_TEXTURES, MVTEC_OBJECTS),
}

#: The paper-size model of ``configs/pmad/mvtec.yaml`` (local weights files, see the README).
MODEL: dict[str, Any] = {
    "class_path": "anomalib_mcad.Pmad",
    "init_args": {
        "arch": "base",
        "tokenizer": "vit",
        "tokenizer_weights": "./weights/tokenizer/vit_tokenizer.pth",
        "pretrained": "./weights/beit_base_patch16_224_pt22k.pth",
        "proto_backbone": "tf_efficientnet_b6",
        "proto_pretrained": True,
        "support_coreset_ratio": 1.0,
    },
}
TRAINER: dict[str, Any] = {"max_epochs": 300, "check_val_every_n_epoch": 1000, "devices": 1}


class _Dumper(yaml.SafeDumper):
    """Block style for mappings, one-line lists (category lists stay readable)."""


_Dumper.add_representer(list, lambda dumper, data: dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=True))


def _config(train: tuple[str, ...], test: tuple[str, ...], shots: int) -> dict[str, Any]:
    data = {
        "class_path": "anomalib_mcad.data.MultiClassDataModule",
        "init_args": {
            "root": "./datasets/MVTecAD",
            "dataset": "mvtec_ad",
            "categories": list(train),
            "test_categories": list(test),
            "support_shots": shots,
            "train_batch_size": 4,
            "eval_batch_size": 16,
            "num_workers": 8,
        },
    }
    return {
        "seed_everything": 0,
        "model": copy.deepcopy(MODEL),
        "data": data,
        "trainer": dict(TRAINER),
        "default_root_dir": "results",
    }


def setting_configs() -> dict[str, tuple[str, dict[str, Any]]]:
    """Relative path -> (header comment, config) of every generated setting."""
    out: dict[str, tuple[str, dict[str, Any]]] = {}
    for held_out in MVTEC_CATEGORIES:
        train = tuple(c for c in MVTEC_CATEGORIES if c != held_out)
        header = (
            f"PMAD cross-class, Table 7's leave-one-out: train on the 14 other MVTec-AD categories, test on the unseen "
            f"'{held_out}'. Its prototypes come from {CROSS_CLASS_SHOTS} normal training images (support_shots); its mask "
            f"ratio is its Table 6 value."
        )
        out[f"cross_class/leave_out_{held_out}.yaml"] = (header, _config(train, (held_out,), CROSS_CLASS_SHOTS))
    for name, (train, test) in SPLITS.items():
        seen, unseen = name.split("_to_")
        header = (
            f"PMAD cross-class, the authors' {seen} -> {unseen} split (train_cross_class.py): train on the {len(train)} "
            f"{seen}, test on the {len(test)} unseen {unseen}, whose prototypes come from {CROSS_CLASS_SHOTS} normal "
            f"training images each (support_shots)."
        )
        out[f"cross_class/{name}.yaml"] = (header, _config(train, test, CROSS_CLASS_SHOTS))
        for shots in SHOTS:
            header = (
                f"PMAD few-shot prototypes (Table 8, k = {shots}): train on the {seen}, test on the unseen {unseen}; "
                f"each unseen category's prototype pool holds all patches of {shots} normal training image(s)."
            )
            out[f"few_shot/{name}_k{shots}.yaml"] = (header, _config(train, test, shots))
    return out


def render(path: str, header: str, config: dict[str, Any]) -> str:
    """The YAML text of one config: a comment header (wrapped) and the config."""
    words, lines, line = header.split(), [], "#"
    for word in words:
        if len(line) + len(word) + 1 > 110:
            lines.append(line)
            line = "#"
        line += f" {word}"
    lines.append(line)
    lines.append("# Generated by: python -m anomalib_mcad.models.image.pmad.settings configs/pmad (do not edit by hand)")
    lines.append(f"# anomalib train --config configs/pmad/{path}")
    return "\n".join(lines) + "\n" + yaml.dump(config, Dumper=_Dumper, sort_keys=False, width=200)


def write(root: str | Path) -> list[Path]:
    """Write every setting's config under ``root``; returns the paths written."""
    root = Path(root)
    written = []
    for relative, (header, config) in setting_configs().items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(render(relative, header, config))
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> None:
    """Command line: write the configs under the given folder (``configs/pmad``)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("root", nargs="?", default="configs/pmad", help="folder that receives cross_class/ and few_shot/")
    for path in write(parser.parse_args(argv).root):
        print(path)


if __name__ == "__main__":
    main()
