"""The console script's helps (program names, descriptions, defaults, no RST markup) and the README's layout section."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from anomalib_mcad.cli import build_parser, main

REPO = Path(__file__).resolve().parents[2]


def _help(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("command", [[], ["demo"], ["synth"], ["compare"]])
def test_helps_name_the_program_and_have_no_rst(command: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    text = _help([*command, "--help"], capsys)
    assert text.startswith(f"usage: {' '.join(['anomalib-mcad', *command])}"), text[:200]
    assert "``" not in text and ":func:" not in text and "python -m" not in text.split("\n", 1)[0]


def test_every_demo_option_has_a_description_and_its_default() -> None:
    demo = next(a for a in build_parser()._subparsers._group_actions[0].choices.items() if a[0] == "demo")[1]  # noqa: SLF001
    for action in demo._actions:  # noqa: SLF001
        if action.dest == "help":
            continue
        assert action.help, action.dest
    text = " ".join(demo.format_help().split())
    for default in ("(default: dinomaly)", "(default: demo_output)", "(default: 120)", "(default: 128)", "(default: 112)", "(default: 8)"):
        assert default in text, default


def test_readme_layout_names_only_what_exists() -> None:
    readme = (REPO / "README.md").read_text()
    block = readme.split("## Layout", 1)[1].split("```", 2)[1]
    paths = re.findall(r"^(\S+)", block, flags=re.MULTILINE)
    for entry in paths:
        for part in entry.split(","):
            part = part.strip().replace("<model>", "dinomaly")
            if part and "/" in part or part.endswith(".py"):
                target = REPO / part if "/" in part else REPO / "anomalib_mcad" / part
                assert target.exists(), part
    models = REPO / "anomalib_mcad" / "models" / "image"
    for folder in (p for p in models.iterdir() if p.is_dir() and not p.name.startswith("_")):
        assert {"torch_model.py", "lightning_model.py", "README.md"} <= {f.name for f in folder.iterdir()}, folder.name
        assert not (folder / "anomaly_map.py").exists() or "anomaly_map.py" in block
    named = re.findall(r"\b(\w+)/(\w+\.py)", block)
    folders = {p.name for p in models.iterdir() if p.is_dir()}
    assert {("inp_former", "augmentation.py"), ("pmad", "protoflow.py")} <= set(named)
    for folder, name in named:
        if folder in folders:
            assert (models / folder / name).is_file(), (folder, name)
