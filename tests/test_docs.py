"""Every hook is documented in docs/plugins.md with its signature (as datasette does), and every
relative link in the README and docs/ reaches a file and, with an anchor, one of its headings."""

from __future__ import annotations

import functools
import inspect
import re
from pathlib import Path

import pytest

from medvlsam2.core import hookspecs

DOC = Path(__file__).resolve().parents[1] / "docs" / "plugins.md"
HOOKS = [name for name, f in vars(hookspecs).items() if name.startswith("register_") and inspect.isfunction(f)]


def test_there_is_one_hook_per_kind():
    from medvlsam2.core.registry import KINDS

    assert sorted(HOOKS) == sorted(f"register_{kind}" for kind in KINDS)


@pytest.mark.parametrize("hook", HOOKS)
def test_hook_is_documented_with_signature(hook):
    text = DOC.read_text()
    assert f"### {hook}(register)" in text, f"{hook} has no section in docs/plugins.md"


ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def prose(page: Path) -> str:
    """A Markdown page without its fenced code blocks."""
    return re.sub(r"^```.*?^```", "", page.read_text(), flags=re.S | re.M)


@functools.cache
def heading_anchors(page: Path) -> set[str]:
    """The anchors GitHub gives a page's headings: lower case, punctuation dropped, spaces as
    hyphens, a repeated heading numbered -1, -2 …"""
    anchors: set[str] = set()
    for heading in re.findall(r"^#{1,6} (.+)$", prose(page), flags=re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        anchor, n = slug, 0
        while anchor in anchors:
            n += 1
            anchor = f"{slug}-{n}"
        anchors.add(anchor)
    return anchors


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_relative_link_reaches_a_file_and_heading(page):
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", prose(page)):
        if re.match(r"[a-z]+:", target):
            continue  # http(s):, mailto: …
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(f"{target} (no file {path})")
        elif anchor and file.suffix == ".md" and anchor not in heading_anchors(file):
            broken.append(f"{target} (no heading #{anchor} in {file.name})")
    assert not broken, f"{page.relative_to(ROOT)}: broken links: {broken}"
