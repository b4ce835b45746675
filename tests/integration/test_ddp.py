"""Distributed training: every model under 2-process DDP (CPU, gloo) against the same training in one process.

One launch of ``tests/integration/ddp_compare.py`` (plus one per model listed in ``XFAIL``, so that a model
breaking its launch cannot take the others down) trains every model of :func:`anomalib_mcad.list_models`
(tiny CPU config, random weights) for ``STEPS`` steps: first in one process with training batch
``2 b``, then under ``Engine(strategy="ddp", devices=2, accelerator="cpu")`` with per-rank batch ``b``,
and runs ``engine.test`` after each. Per model the test checks:

* the global batch: at every step the two ranks' batches together are the single process's batch
  (``MultiClassDataModule``'s distributed sampler splits the same seeded order);
* both ranks end with identical state (weights and every buffer);
* memory built from the whole training set (coresets, prototype pools, statistics, calibration:
  every floating buffer) equals the single-process one within float tolerance (``MEMORY_RTOL``);
* trained weights: ``|w_ddp - w_1| <= WEIGHT_TOL[model] * |w_1 - w_0|`` (norms over all trainable
  parameters, ``w_0`` the common initial weights): the DDP update is the single-process update up to
  a stated fraction of its size;
* test scores of every test image (``engine.test``; DDP's are gathered over ranks by
  ``PerCategoryMetrics``): ``max |s_ddp - s_1| <= SCORE_TOL[model] * std(s_1)``.

The tolerances (measured values beside them):

* DDP averages the per-rank gradients, so for a loss that is a mean over samples one DDP step is one
  single-process step on the global batch. Dinomaly's hard-mining quantile and INP-Former's
  soft-mining mean are batch statistics; they are taken over the global batch
  (``components.distributed``), so these losses behave the same way. What remains is rounding
  (another reduction order), which Adam-type optimisers amplify in the first steps (the update is
  ~ lr * g / |g| per element, so an element with a near-zero gradient can flip sign): 1e-3 of the
  update and of the score spread. With per-rank batch statistics instead the gap was 1.3e-2
  (Dinomaly) and 1.4e-1 (INP-Former), and a missing gradient average is larger still.
  Dropout and feature jitter draw per-rank random streams that cannot reproduce the single
  process's draws for the same images, so they are switched off here (``OVERRIDES`` in the script).
* MaskAD and PMAD draw their training masks on each rank from the same seeded generator, so a rank's
  images get other masks than the single process gives them: their reconstruction weights agree
  only in size (tolerance 1.0 of the update) and scores within half the score spread. Everything
  no mask touches is held tight: their flows (1e-3 of the update), the coreset / prototype pool,
  feature statistics, M_po scale and likelihood reference (``MEMORY_RTOL``), and the number of
  patch errors PMAD records (every rank records the whole global batch).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from anomalib_mcad import list_models

pytestmark = pytest.mark.slow

SCRIPT = Path(__file__).with_name("ddp_compare.py")
STEPS = 2
BATCH = 2  # per rank; the single process trains with 2 * BATCH
MEMORY_RTOL, MEMORY_ATOL = 1e-5, 1e-6
LAUNCH_TIMEOUT = 1200  # seconds per launch: generous for a loaded CI machine; a hung collective ends here
#: |w_ddp - w_1| / |w_1 - w_0| allowed per model (measured on CPU in the comments).
WEIGHT_TOL: dict[str, float] = {
    "dinomaly": 1e-3,  # 2.4e-6
    "inp_former": 1e-3,  # 8.1e-5
    "mint_ad": 1e-3,  # 5.1e-6
    "mask_ad": 1.0,  # 0.37: training masks differ (its flow alone: 1.3e-6, see EXACT_PARTS)
    "pmad": 1.0,  # 0.54: training masks differ (its flow alone: 1.7e-6)
}
#: Parameters of mask-drawing models that no mask touches: held to the tight tolerance.
EXACT_PARTS: dict[str, str] = {"mask_ad": "model.flow.", "pmad": "model.protoflow.flow."}
#: max |s_ddp - s_1| / std(s_1) allowed per model (measured in the comments).
SCORE_TOL: dict[str, float] = {
    "dinomaly": 1e-3,  # 1.9e-6
    "inp_former": 1e-3,  # 1.3e-5
    "mint_ad": 1e-3,  # 3.5e-7
    "mask_ad": 0.5,  # 0.027
    "pmad": 0.5,  # 0.20
}
#: Buffers recorded at the masked positions of training images (PMAD's dynamic-masking error
#: recorder): the positions depend on the masks, so only the number of recordings must agree
#: (every rank records the whole global batch).
MASK_DEPENDENT: dict[str, tuple[str, ...]] = {"pmad": ("errors.errors", "errors.counts")}
#: Models whose DDP case may fail, with the reason (not strict: once the cause is fixed they pass; then delete).
#: Each gets its own launch, so that a model aborting its launch cannot take the others down.
XFAIL: dict[str, str] = {}


def launch(root: Path, out: Path, models: list[str]) -> None:
    """One run of the script for ``models`` (single-process runs, then one DDP launch); its log in ``out``.

    A model that breaks the DDP launch (a crash or a collective mismatch aborts both ranks) leaves the
    result files of the models after it missing; their cases then fail with the log. Models listed in
    :data:`XFAIL` are therefore launched on their own.
    """
    out.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k not in {"LOCAL_RANK", "RANK", "WORLD_SIZE", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT"}}
    command = [sys.executable, str(SCRIPT), "--root", str(root), "--out", str(out), "--steps", str(STEPS), "--batch", str(BATCH),
               "--models", ",".join(models)]  # fmt: skip
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)  # noqa: S603
    try:
        log, _ = process.communicate(timeout=LAUNCH_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)  # the launch and the rank Lightning started (same session)
        log, _ = process.communicate()
        log += f"\n[test_ddp] killed after {LAUNCH_TIMEOUT} s (a rank waiting in a collective?)"
    (out / "log.txt").write_text(f"exit code {process.returncode}\n{log}")


@pytest.fixture(scope="module")
def results(synthetic_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """The result folder of a model; runs its launch on first use (one for all models not in XFAIL)."""
    base = tmp_path_factory.mktemp("ddp")
    main = [name for name in list_models() if name not in XFAIL]
    done: set[str] = set()

    def folder(name: str) -> Path:
        group = "main" if name in main else name
        if group not in done:
            launch(synthetic_root, base / group, main if group == "main" else [name])
            done.add(group)
        return base / group

    return folder


def load(out: Path, mode: str, name: str, rank: int) -> dict[str, Any]:
    path = out / f"{mode}_{name}_rank{rank}.pt"
    assert path.is_file(), f"{path.name} missing; log of the launch:\n{(out / 'log.txt').read_text()[-4000:]}"
    result = torch.load(path, weights_only=False)
    assert "error" not in result, f"{mode} run of {name} (rank {rank}) failed:\n{result.get('error')}"
    return result


def norm(tensors: list[torch.Tensor]) -> float:
    return float(torch.sqrt(sum((t.double() ** 2).sum() for t in tensors)))


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=pytest.mark.xfail(reason=XFAIL[n], strict=False)) if n in XFAIL else n for n in list_models()]
)
def test_ddp_matches_single_process(name: str, results: Callable[[str], Path]) -> None:
    out = results(name)
    single = load(out, "single", name, 0)
    rank0, rank1 = load(out, "ddp", name, 0), load(out, "ddp", name, 1)
    assert single["global_step"] == rank0["global_step"] == rank1["global_step"] > 0

    # the global batch of every step is the single process's batch
    assert len(single["batches"]) == len(rank0["batches"]) == len(rank1["batches"])
    for step, batch in enumerate(single["batches"]):
        assert len(rank0["batches"][step]) == len(rank1["batches"][step]) == BATCH
        assert sorted(rank0["batches"][step] + rank1["batches"][step]) == sorted(batch), f"step {step}"

    # identical replicas; identical starting weights in both runs
    assert rank0["state"].keys() == rank1["state"].keys() == single["state"].keys()
    for key, value in rank0["state"].items():
        torch.testing.assert_close(rank1["state"][key], value, rtol=0, atol=0, equal_nan=True, msg=f"ranks differ: {key}")
    for key, value in single["initial"].items():
        torch.testing.assert_close(rank0["initial"][key], value, rtol=0, atol=0, msg=f"initial weights differ: {key}")

    # memory built from the whole training set (every buffer) as in one process
    parameters = set(single["parameters"])
    buffers = [k for k in single["state"] if k not in parameters]
    for key in buffers:
        a, b = rank0["state"][key], single["state"][key]
        if key in MASK_DEPENDENT.get(name, ()):
            if key.endswith("counts"):
                assert float(a.sum()) == float(b.sum()) > 0, f"{key}: {float(a.sum())} recordings under DDP, {float(b.sum())} in one process"
            continue
        if a.is_floating_point():
            torch.testing.assert_close(a, b, rtol=MEMORY_RTOL, atol=MEMORY_ATOL, equal_nan=True, msg=f"memory differs: {key}")
        else:
            assert torch.equal(a, b), f"memory differs: {key}"

    # trained weights: the DDP update is the single-process update up to WEIGHT_TOL of its size
    trained = [k for k in single["initial"] if not torch.equal(single["state"][k], single["initial"][k])]
    assert trained, "nothing trained in the single-process run"
    step = norm([single["state"][k] - single["initial"][k] for k in trained])
    gap = norm([rank0["state"][k] - single["state"][k] for k in single["initial"]])
    print(f"{name}: |w_ddp - w_1| / |w_1 - w_0| = {gap / step:.2e}")  # noqa: T201
    assert gap <= WEIGHT_TOL[name] * step, f"{name}: |w_ddp - w_1| = {gap:.3g} > {WEIGHT_TOL[name]} x update {step:.3g}"
    if name in EXACT_PARTS:
        part = [k for k in trained if k.startswith(EXACT_PARTS[name])]
        assert part, f"no trained parameter under {EXACT_PARTS[name]}"
        part_step = norm([single["state"][k] - single["initial"][k] for k in part])
        part_gap = norm([rank0["state"][k] - single["state"][k] for k in part])
        assert part_gap <= 1e-3 * part_step, f"{EXACT_PARTS[name]}: |w_ddp - w_1| = {part_gap:.3g} > 1e-3 x update {part_step:.3g}"

    # test scores of every test image
    s1, s2 = single["scores"], rank0["scores"]
    assert s1 and s2 and s1.keys() == s2.keys(), "engine.test scored other images under DDP"
    a = torch.tensor([s1[k] for k in sorted(s1)], dtype=torch.float64)
    b = torch.tensor([s2[k] for k in sorted(s1)], dtype=torch.float64)
    spread = float(a.std())
    worst = float((a - b).abs().max())
    print(f"{name}: max |s_ddp - s_1| / std(s_1) = {worst / spread:.2e}")  # noqa: T201
    assert worst <= SCORE_TOL[name] * spread, f"{name}: scores differ by {worst:.3g}, > {SCORE_TOL[name]} x std {spread:.3g}"
