"""README's output table and error-code list say what ``schemas/rows.py`` says: no column or code
missing, none that does not exist."""

import re

from schemas.rows import OUTPUT_SCHEMA, ErrorCode
from tests.helpers import REPO


def _output_section() -> str:
    text = (REPO / "README.md").read_text()
    start = text.index("### Output\n")
    return text[start : text.index("\n## ", start)]


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
