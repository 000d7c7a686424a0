"""README.md and docs/ stand alone: no link out of the repository, no word about how it was made.

Inline code (`session.run`, an API's name) may say anything; prose may not.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.conftest import REPO

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
OUTSIDE = re.compile(r"DESIGN\.md|\.\./shared")  # files that do not ship with the repository
SESSION = re.compile(r"\bsessions?\b", re.IGNORECASE)
_FENCE = re.compile(r"^(```|~~~).*?^\1", re.MULTILINE | re.DOTALL)
_CODE = re.compile(r"`[^`\n]*`")


def prose(text: str) -> str:
    """The text with code blocks and inline code blanked, so line numbers stay right."""
    text = _FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), text)
    return _CODE.sub("``", text)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_a_page_names_nothing_outside_the_repository_and_no_session(page: Path) -> None:
    text = page.read_text()
    problems = []
    for number, line in enumerate(text.splitlines(), 1):
        if OUTSIDE.search(line):  # not even as code
            problems.append(f"{page.name}:{number}: {line.strip()}")
    for number, line in enumerate(prose(text).splitlines(), 1):
        if SESSION.search(line):
            problems.append(f"{page.name}:{number}: {line.strip()}")
    assert not problems, "say what the software does, not how it is built:\n" + "\n".join(problems)


def test_the_check_sees_what_it_forbids() -> None:
    assert SESSION.search(prose("the last run of the session"))
    assert not SESSION.search(prose("one `session.run` per batch"))
    assert OUTSIDE.search("see DESIGN.md") and OUTSIDE.search("../shared/traces")
