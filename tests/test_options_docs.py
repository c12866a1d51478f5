"""The docs' option table is generated from the one schema of the command line (issue 21, item 5)."""

from __future__ import annotations

from pathlib import Path

from st_peft_cli.options import options_markdown

DOCS = Path(__file__).resolve().parent.parent / "docs" / "options.md"


def test_docs_option_table_matches_the_schema():
    assert DOCS.read_text() == options_markdown(), "regenerate: python -m st_peft_cli.options > docs/options.md"
