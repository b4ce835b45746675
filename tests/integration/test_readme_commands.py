"""Every ``anomalib ...`` and ``anomalib-mcad ...`` command of README.md works as written, offline (issue 17).

Commands are read from the README's ``bash`` blocks (continuation lines joined, comments dropped,
``&&`` chains split). Those that run offline in seconds run: ``anomalib-mcad synth`` with its
defaults, and the ``anomalib`` commands given a ``--ckpt_path`` (test, export), which run in a
folder where ``configs/dinomaly/mvtec.yaml`` is the real config shrunk to a ViT-S at 56 px on the
synthetic data, *still with* ``pretrained: true``, against a checkpoint this test writes, with
the hub unreachable. Only the ``results/.../model.ckpt`` placeholder is replaced. The others
must parse: ``anomalib`` commands with ``--print_config``, ``anomalib-mcad compare`` through its
own settings loader (overrides applied), the rest with ``--help``.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
CKPT_PLACEHOLDER = "results/.../model.ckpt"


def readme_commands() -> list[str]:
    """The ``anomalib``/``anomalib-mcad`` command lines of README.md's bash blocks, in order."""
    text = (REPO / "README.md").read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.DOTALL):
        for line in block.replace("\\\n", " ").splitlines():
            for part in line.split("#", 1)[0].split("&&"):
                command = " ".join(part.split())
                if command.split(" ", 1)[0] in ("anomalib", "anomalib-mcad"):
                    commands.append(command)
    return commands


COMMANDS = list(dict.fromkeys(readme_commands()))  # each distinct command once
RUN_WITH_CHECKPOINT = [c for c in COMMANDS if c.startswith("anomalib ") and "--ckpt_path" in c]
RUN_AS_IS = [c for c in COMMANDS if shlex.split(c)[1:] == ["synth", "--root", "./datasets/synthetic"]]
PARSE_ONLY = [c for c in COMMANDS if c not in RUN_WITH_CHECKPOINT + RUN_AS_IS]


def test_the_readme_has_the_commands_this_test_checks() -> None:
    assert len(COMMANDS) >= 12, COMMANDS
    assert any(c.startswith("anomalib test --config configs/dinomaly/mvtec.yaml --ckpt_path") for c in RUN_WITH_CHECKPOINT)
    assert any(c.startswith("anomalib export --model anomalib_mcad.Dinomaly --ckpt_path") for c in RUN_WITH_CHECKPOINT)
    assert RUN_AS_IS, "the README no longer writes the synthetic dataset with its defaults"
    assert all(CKPT_PLACEHOLDER in c for c in RUN_WITH_CHECKPOINT)


@pytest.mark.parametrize("command", PARSE_ONLY)
def test_command_parses(command: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(REPO)  # the README's relative config paths
    argv = shlex.split(command)
    if argv[0] == "anomalib":
        from anomalib.cli import AnomalibCLI

        with pytest.raises(SystemExit) as exit_info:
            AnomalibCLI(args=[*argv[1:], "--print_config"])
        assert exit_info.value.code in (0, None), capsys.readouterr()
        printed = yaml.safe_load(capsys.readouterr().out)
        assert printed["model"]["class_path"].startswith("anomalib_mcad.")
        # what the command line says is what the configuration holds
        for option, value in zip(argv[1:], argv[2:], strict=False):
            if option == "--trainer.max_steps":
                assert printed["trainer"]["max_steps"] == int(value)
        return
    if argv[1] == "compare":
        from anomalib_mcad.compare.config import load_settings

        # "my.yaml" stands for the user's file: any comparison config of the repository
        args = ["configs/compare/synthetic_cpu.yaml" if a == "my.yaml" else a for a in argv[2:]]
        models, data, settings = load_settings(args)
        assert models and "class_path" in data
        if "--data.init_args.root" in args:
            assert data["init_args"]["root"] == args[args.index("--data.init_args.root") + 1]
        if "--seed" in args:
            assert settings.seed == int(args[args.index("--seed") + 1])
        return
    from anomalib_mcad.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main([*argv[1:], "--help"])
    assert exit_info.value.code in (0, None)
    assert "usage: anomalib-mcad" in capsys.readouterr().out


def _offline_env(tmp_path: Path) -> dict[str, str]:
    """This worktree's package, and a hub that cannot be reached: an empty cache, offline mode."""
    env = dict(os.environ)
    env.update(
        PYTHONPATH=str(REPO),
        HF_HOME=str(tmp_path / "hf_home"),
        HF_HUB_OFFLINE="1",
        TORCH_HOME=str(tmp_path / "torch_home"),
    )
    return env


def _run(argv: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    result = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "Could not download" not in result.stdout + result.stderr
    return result


def _shrunk_mvtec_config(cwd: Path) -> Path:
    """``configs/dinomaly/mvtec.yaml`` with a ViT-S at 56 px on ``./datasets/synthetic``; ``pretrained`` untouched."""
    config = yaml.safe_load((REPO / "configs" / "dinomaly" / "mvtec.yaml").read_text())
    assert config["model"]["init_args"]["pretrained"] is True  # the download the command must not need
    config["model"]["init_args"].update(encoder_name="vit_small_patch14_reg4_dinov2", image_size=64, crop_size=56)
    config["data"]["init_args"].update(root="./datasets/synthetic", dataset="mvtec_layout", num_workers=0)
    config["trainer"].update(accelerator="cpu", logger=False)
    path = cwd / "configs" / "dinomaly" / "mvtec.yaml"
    path.parent.mkdir(parents=True)
    path.write_text(yaml.safe_dump(config))
    return path


def _checkpoint_trained_from_hub_weights(cwd: Path, config: dict) -> Path:
    """One training step of that model (random encoder), saved as if it had started from the hub weights."""
    from anomalib.engine import Engine

    from anomalib_mcad import Dinomaly
    from anomalib_mcad.data import MultiClassDataModule

    kwargs = {**config["model"]["init_args"], "pretrained": False}
    datamodule = MultiClassDataModule(**{**config["data"]["init_args"], "root": str(cwd / "datasets" / "synthetic")})
    engine = Engine(max_steps=1, logger=False, default_root_dir=cwd / "train", devices=1, accelerator="cpu", enable_progress_bar=False)
    engine.fit(Dinomaly(**kwargs), datamodule=datamodule)
    written = sorted((cwd / "train").rglob("*.ckpt"))[-1]
    checkpoint = torch.load(written, map_location="cpu", weights_only=False)
    checkpoint["hyper_parameters"]["pretrained"] = True
    path = cwd / "trained" / "model.ckpt"
    path.parent.mkdir()
    torch.save(checkpoint, path)
    return path


def test_commands_run_offline_with_a_checkpoint(tmp_path: Path) -> None:
    """``anomalib test/export ... --ckpt_path`` need no download: the checkpoint holds every weight."""
    cwd = tmp_path / "work"
    cwd.mkdir()
    env = _offline_env(tmp_path)
    bin_dir = Path(sys.executable).parent
    for command in RUN_AS_IS:  # anomalib-mcad synth --root ./datasets/synthetic
        argv = shlex.split(command)
        _run([str(bin_dir / argv[0]), *argv[1:]], cwd, env)
    assert (cwd / "datasets" / "synthetic" / "pcb" / "test").is_dir()
    config_path = _shrunk_mvtec_config(cwd)
    checkpoint = _checkpoint_trained_from_hub_weights(cwd, yaml.safe_load(config_path.read_text()))
    categories = sorted(p.name for p in (cwd / "datasets" / "synthetic").iterdir() if p.is_dir())
    for command in RUN_WITH_CHECKPOINT:
        argv = [str(checkpoint) if a == CKPT_PLACEHOLDER else a for a in shlex.split(command)]
        result = _run([str(bin_dir / argv[0]), *argv[1:]], cwd, env)
        if argv[1] == "test":
            for category in categories:
                assert f"| {category} " in result.stdout, result.stdout[-2000:]
            assert "per_category_mean_image_AUROC" in result.stdout
        if argv[1] == "export":
            assert list(cwd.rglob("openvino/model.xml")), result.stdout[-2000:]
