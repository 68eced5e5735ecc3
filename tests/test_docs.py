"""The user-facing docs agree with the code.

- The guide's "## Options" table is the one list of options: its names are the fields of
  `SessionConfig`, and its default column starts with each field's default as a Python literal
  in backticks (`"auto"`, `2`, `None`), optionally followed by prose (`None`: cores − 1). An
  enum default is written as its value, what a user passes (`"zstd"` for `Codec.ZSTD`).
- Shipped docs point to docs/design.md, never to "DESIGN §N" of a file that is not shipped.
"""

import ast
import dataclasses
import enum
import re
from pathlib import Path

import pytest

from vzstream.config import SessionConfig

ROOT = Path(__file__).resolve().parents[1]
GUIDE = ROOT / "docs" / "guide.md"


def options_table(text: str) -> dict[str, str]:
    """The first table under "## Options": {option name: default cell}."""
    lines = text.splitlines()
    start = lines.index("## Options") + 1
    rows, seen_table = {}, False
    for line in lines[start:]:
        if line.startswith("## "):
            break
        if not line.startswith("|"):
            if seen_table:
                break
            continue
        seen_table = True
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
        if cells[0] == "option" or set(cells[0]) <= set("-: "):
            continue                                   # header and separator rows
        name = cells[0].strip("`")
        assert name not in rows, f"docs/guide.md lists option `{name}` twice"
        rows[name] = cells[1]
    return rows


def field_default(field: dataclasses.Field):
    default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
    return default.value if isinstance(default, enum.Enum) else default


def documented_default(cell: str):
    """`2`: cores − 1 -> 2. The cell must open with one backticked Python literal."""
    m = re.match(r"`([^`]+)`", cell)
    if not m:
        return None, False
    try:
        return ast.literal_eval(m.group(1)), True
    except (ValueError, SyntaxError):
        return m.group(1), False


def test_options_table_names_every_sessionconfig_field_and_nothing_else():
    table = options_table(GUIDE.read_text())
    fields = [f.name for f in dataclasses.fields(SessionConfig)]
    missing = [name for name in fields if name not in table]
    extra = [name for name in table if name not in fields]
    assert not missing and not extra, (
        f"docs/guide.md's Options table and SessionConfig differ: missing from the table "
        f"{missing}, in the table but not an option {extra}")


@pytest.mark.parametrize("field", dataclasses.fields(SessionConfig), ids=lambda f: f.name)
def test_options_table_default_is_the_fields_default(field):
    table = options_table(GUIDE.read_text())
    if field.name not in table:
        pytest.skip("missing from the table: the test above names it")
    default = field_default(field)
    value, is_literal = documented_default(table[field.name])
    assert is_literal and value == default and type(value) is type(default), (
        f"docs/guide.md's Options table gives `{field.name}` the default {table[field.name]!r}; "
        f"its default column must start with `{default!r}` (SessionConfig's default), then any prose")


def shipped_docs() -> list[Path]:
    # docs/gpu-runs/ holds a past run's output verbatim (its rows quote the labels the benchmark
    # printed then), so it is a record, not a page to keep current.
    docs = [p for p in (ROOT / "docs").rglob("*.md") if "gpu-runs" not in p.relative_to(ROOT).parts]
    code = sorted((ROOT / "vzstream").rglob("*.py"))
    return [ROOT / "README.md", *docs, *sorted((ROOT / "examples").glob("*.py")), *code]


def test_no_shipped_doc_points_to_design_sections():
    found = [f"{p.relative_to(ROOT)}:{n}: {line.strip()}"
             for p in shipped_docs() for n, line in enumerate(p.read_text().splitlines(), 1)
             if "DESIGN §" in line or "DESIGN.md" in line]
    assert not found, "point to docs/design.md (by section name) instead of:\n" + "\n".join(found)
