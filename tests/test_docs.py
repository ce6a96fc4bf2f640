"""The documentation holds together: the README stays a landing page, every page of docs/ is listed
in the manual's index, and every relative link of the README and docs/ (file and #anchor) resolves."""

from __future__ import annotations

import re
from pathlib import Path

from conftest import REPO

DOCS = REPO / "docs"
PAGES = [REPO / "README.md", *sorted(DOCS.glob("*.md"))]
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")


def _strip_code(text: str) -> str:
    """The text without fenced blocks and inline code, where a [x](y) is not a link."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)
    return re.sub(r"`[^`\n]*`", "", text)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    h = heading.strip().lower().replace("`", "")
    h = re.sub(r"[^\w\- ]", "", h)
    return h.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = re.sub(r"^```.*?^```", "", path.read_text(encoding="utf-8"), flags=re.M | re.S)
    return {slug(m.group(1)) for m in re.finditer(r"^#{1,6}\s+(.+?)\s*$", text, flags=re.M)}


def test_every_docs_page_is_listed_in_the_index():
    """docs/index.md links every page of docs/ (a page no index names is a page nobody finds)."""
    index = (DOCS / "index.md").read_text(encoding="utf-8")
    linked = {m.group(1).split("#")[0] for m in LINK.finditer(index)}
    missing = [p.name for p in DOCS.glob("*.md") if p.name != "index.md" and p.name not in linked]
    assert not missing, f"docs/index.md does not link {missing}"


def test_every_relative_link_resolves():
    """Every relative link in README.md and docs/*.md names a file that exists and, with a #anchor,
    a heading of that file (GitHub's slug of it)."""
    broken = []
    for page in PAGES:
        for m in LINK.finditer(_strip_code(page.read_text(encoding="utf-8"))):
            target = m.group(1)
            if re.match(r"[a-z]+:", target):  # http:, https:, mailto:, file:
                continue
            file_part, _, anchor = target.partition("#")
            dest = (page.parent / file_part).resolve() if file_part else page
            if not dest.exists():
                broken.append(f"{page.relative_to(REPO)}: {target}: no such file")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                broken.append(f"{page.relative_to(REPO)}: {target}: no heading with that anchor")
    assert not broken, "\n".join(broken)


def test_the_readme_is_a_landing_page():
    """README.md stays within about 150 lines and links the manual's index (the rest lives in docs/)."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 160, "the README grew past a landing page: move the detail to docs/"
    assert "(docs/index.md)" in text
