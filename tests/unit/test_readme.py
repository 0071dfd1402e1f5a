"""docs/data.md's output table and error-code list say what ``schemas/rows.py`` says: no column or code
missing, none that does not exist."""

import re

from schemas.rows import OUTPUT_SCHEMA, ErrorCode
from tests.helpers import REPO


def _output_section() -> str:
    text = (REPO / "docs" / "data.md").read_text()
    start = text.index("## Output\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end != -1 else len(text)]


def test_the_output_table_lists_every_column_of_the_schema():
    rows = [line for line in _output_section().splitlines() if line.startswith("| `")]
    documented = [name for row in rows for name in re.findall(r"`(\w+)`", row.split("|")[1])]
    assert len(documented) == len(set(documented))
    assert set(documented) == set(OUTPUT_SCHEMA.names)


def test_the_error_code_list_is_the_schemas():
    section = _output_section()
    paragraph = section[section.index("Error codes:") :].split("\n\n")[0]
    documented = re.findall(r"`([A-Z_]+)`", paragraph)
    assert len(documented) == len(set(documented))
    assert set(documented) == {code.value for code in ErrorCode}


def test_the_front_page_links_pages_that_exist():
    front = (REPO / "README.md").read_text()
    links = re.findall(r"\]\(((?:docs|bench)/[\w./-]+|CHANGELOG\.md)\)", front)
    assert len(links) >= 12
    for link in links:
        assert (REPO / link).exists(), f"README links {link}, which does not exist"
