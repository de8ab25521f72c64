"""The documentation that is generated, or that holds commands, stays true to the code."""

from pathlib import Path

import pytest

from fedtower.config_reference import reference_markdown

ROOT = Path(__file__).resolve().parents[1]


def test_the_configuration_reference_is_the_one_the_code_generates():
    # Execute
    generated = reference_markdown()
    # Assert: regenerate with `fedtower config reference > docs/configuration.md` when this fails.
    assert (ROOT / "docs" / "configuration.md").read_text() == generated


def test_every_run_config_and_node_config_key_is_in_the_reference():
    # Prepare
    from dataclasses import fields

    from fedtower.client.node_settings import NodeSettings
    from fedtower.config import RunSettings

    text = (ROOT / "docs" / "configuration.md").read_text()
    # Assert
    for cls in (RunSettings, NodeSettings):
        for field in fields(cls):
            if field.name != "raw":
                assert f"`{field.name.replace('_', '-')}`" in text, field.name


def runnable_blocks(path: Path) -> list[str]:
    """The fenced blocks marked ```bash runnable (commands a reader can paste as they are)."""
    blocks, current = [], None
    for line in path.read_text().splitlines():
        if current is None and line.strip() == "```bash runnable":
            current = []
        elif current is not None and line.strip() == "```":
            blocks.append("\n".join(current))
            current = None
        elif current is not None:
            current.append(line)
    assert current is None, f"{path}: a runnable block is not closed"
    return blocks


def documents_with_runnable_commands() -> list[Path]:
    return [p for p in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))] if runnable_blocks(p)]



@pytest.mark.simulation
@pytest.mark.parametrize("document", documents_with_runnable_commands(), ids=lambda p: p.name)
def test_every_runnable_command_in_the_docs_runs_as_written(document, tmp_path):
    # Prepare: a fresh directory, the installed `fedtower` first on PATH.
    import os
    import subprocess
    import sys

    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "FLWR_TELEMETRY_ENABLED": "0"}  # fmt: skip
    # Execute: the document's blocks in order, in one directory (later blocks use what earlier ones made).
    for number, block in enumerate(runnable_blocks(document), start=1):
        done = subprocess.run(["bash", "-euo", "pipefail", "-c", block], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=900)  # fmt: skip
        # Assert
        assert done.returncode == 0, f"{document.name} block {number} failed:\n{block}\n{done.stderr[-3000:]}"


def test_the_readme_has_runnable_commands_for_each_journey():
    blocks = "\n".join(runnable_blocks(ROOT / "README.md"))
    for command in ("fedtower simulate", "fedtower recommend", "fedtower audit"):
        assert command in blocks


def test_every_relative_link_in_the_readme_and_docs_points_at_a_file_that_exists():
    import re

    broken = []
    for document in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)\s]+)\)", document.read_text()):
            if target.startswith(("http://", "https://", "mailto:", "#")):
                continue
            path = (document.parent / target.split("#", 1)[0]).resolve()
            if not path.exists():
                broken.append(f"{document.relative_to(ROOT)} -> {target}")
    assert broken == []
