"""docs/config.md is the config models' own reference (schemas.reference): every key, with a description."""

from schemas.reference import reference
from tests.helpers import REPO


def test_the_config_reference_is_generated_from_the_models():
    written = (REPO / "docs" / "config.md").read_text()
    assert written == reference(), (
        "docs/config.md is stale. Try: python -m schemas.reference > docs/config.md"
    )


def test_every_key_has_a_type_a_default_and_a_description():
    rows = [line for line in reference().splitlines() if line.startswith("| `")]
    assert len(rows) > 100  # every section walked into, not only the top level
    for row in rows:
        key, type_name, default, description = (cell.strip() for cell in row.strip("|").split(" | "))
        assert type_name and default and description, f"{key} lacks a description in its model"
    keys = [row.split("`")[1] for row in rows]
    assert "engine.kv_cache_memory_gib" in keys and "tasks.<name>.max_tokens" in keys
