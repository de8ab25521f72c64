"""The documentation that is generated, or that holds commands, stays true to the code."""

from pathlib import Path

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
