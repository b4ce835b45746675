"""Where a learning test's floor must sit: the same recipe trained and untrained, over several seeds.

A learning check means something only if the same model untrained fails it. This runs a test's
recipe (``tests/integration/learning.py``: model, data, steps) with ``steps=0`` and with the test's
steps for each seed, and prints the mean per-category image (and pixel) AUROC of each run, the
untrained maximum and the trained minimum. The floor in the test goes between them.

Usage::

    python benchmarks/learning_floors.py --model dinomaly --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "integration"))
from learning import LEARNING_RECIPES, learning_dataset, run_recipe  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, choices=sorted(LEARNING_RECIPES))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(2)
    work = Path(tempfile.mkdtemp(prefix="floors_"))
    root = learning_dataset(work / "data")
    recipe = LEARNING_RECIPES[args.model]
    rows = {}
    for trained in (False, True):
        for seed in args.seeds:
            result = run_recipe(args.model, root, work / f"{trained}_{seed}", seed=seed, steps=recipe.steps if trained else 0)
            rows[(trained, seed)] = result
            print(f"{args.model} seed {seed} {'trained' if trained else 'untrained'}: image AUROC {result.image_auroc:.3f}, pixel AUROC {result.pixel_auroc:.3f}", flush=True)
    untrained = [r.image_auroc for (t, _), r in rows.items() if not t]
    trained = [r.image_auroc for (t, _), r in rows.items() if t]
    print(f"RESULT {args.model}: untrained image AUROC max {max(untrained):.3f}; trained min {min(trained):.3f} (seeds {args.seeds}, {recipe.steps} steps)")


if __name__ == "__main__":
    main()
