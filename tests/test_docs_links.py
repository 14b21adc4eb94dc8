"""The README and the pages under docs/: every relative link names a file that exists, and
every anchor a heading of that file, by GitHub's rule for heading anchors."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "slurm" / "README.md"]
README_MAX_LINES = 350

FENCE = re.compile(r"^ *(```|~~~).*?^ *\1", re.M | re.S)
INLINE_CODE = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"!?\[[^\]\n]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^ {0,3}#{1,6}\s+(.*?)\s*#*\s*$", re.M)


def _prose(text: str) -> str:
    """The text outside fenced code blocks (a `# comment` in a bash block is no heading)."""
    return FENCE.sub("", text)


def slug(heading: str) -> str:
    """GitHub's anchor of one heading: lowercase, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link's text only
    text = re.sub(r"[^\w\- ]", "", text.strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every anchor of a Markdown file; a repeated heading gets -1, -2, ... as on GitHub."""
    seen: dict[str, int] = {}
    found = set()
    for heading in HEADING.findall(_prose(path.read_text())):
        base = slug(heading)
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return found


def links(path: Path) -> list[str]:
    """The targets of every Markdown link and image of a file, outside code."""
    return LINK.findall(INLINE_CODE.sub("", _prose(path.read_text())))


def _shown(file: Path) -> str:
    return str(file.relative_to(ROOT)) if file.is_relative_to(ROOT) else str(file)


def broken_links(path: Path) -> list[str]:
    problems = []
    for target in links(path):
        if re.match(r"[a-z][a-z0-9+.-]*:", target, re.I):  # http(s)://, mailto: ...
            continue
        name, _, anchor = target.partition("#")
        file = (path.parent / name).resolve() if name else path
        if not file.exists():
            problems.append(f"{target}: no file {_shown(file)}")
        elif anchor and (file.suffix != ".md" or anchor not in anchors(file)):
            problems.append(f"{target}: no heading of {_shown(file)} has the "
                            f"anchor #{anchor}")
    return problems


def test_slug_follows_githubs_rule(tmp_path):
    assert slug("Dataset format (version 1)") == "dataset-format-version-1"
    assert slug("On EC2 (`--cluster ec2`)") == "on-ec2---cluster-ec2"
    assert slug("A training step, op by op") == "a-training-step-op-by-op"
    assert slug("How close `rainforest plan` comes") == "how-close-rainforest-plan-comes"
    page = tmp_path / "page.md"
    page.write_text("# Notes\n\n## Notes\n\n```bash\n# not a heading\n```\n\n## Notes\n")
    assert anchors(page) == {"notes", "notes-1", "notes-2"}


def test_the_pages_are_found():
    names = {str(page.relative_to(ROOT)) for page in PAGES}
    assert {"README.md", "docs/performance.md", "docs/train.md", "slurm/README.md"} <= names
    assert sum(len(links(page)) for page in PAGES) >= 30  # a parser that finds none passes


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(ROOT)))
def test_every_relative_link_and_anchor_resolves(page):
    assert broken_links(page) == []


def test_a_broken_link_is_caught(tmp_path):
    (tmp_path / "other.md").write_text("# Other page\n\n## Its part\n")
    page = tmp_path / "page.md"
    page.write_text("# Page\n\n[ok](other.md#its-part) [ok](#page) [web](https://x.org/#y)\n"
                    "`[code](missing.md)` [gone](missing.md) [bad](other.md#nothing) "
                    "[bad](#nowhere)\n")
    problems = broken_links(page)
    assert len(problems) == 3, problems


def test_the_readme_stays_short():
    lines = (ROOT / "README.md").read_text().count("\n")
    assert lines <= README_MAX_LINES, (
        f"README.md has {lines} lines; reference and measurements belong in docs/")
