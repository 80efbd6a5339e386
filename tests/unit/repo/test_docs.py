"""README.md stays the newcomer's page, and every relative link of it and of docs/ holds.

A link's file must exist (a folder counts: GitHub shows it), and its `#anchor` must name a
heading of the Markdown file it points into, by GitHub's rule: lower case, every character but
letters, digits, `_`, `-` and spaces dropped, spaces turned into hyphens, and `-1`, `-2`, … after
a repeated heading.
"""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote

import pytest

from llamavm import REPO_ROOT

ROOT = REPO_ROOT.resolve()
README = REPO_ROOT / "README.md"
PAGES = [README, *sorted((REPO_ROOT / "docs").glob("*.md"))]
MAX_README_LINES = 300

FENCE_RE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
CODE_SPAN_RE = re.compile(r"(`+)(?:(?!\1).)+?\1", re.DOTALL)
#: [text](target) or [text](target "title"); the text may run over a line break.
INLINE_LINK_RE = re.compile(
    r"!?\[(?P<text>[^\]]*)\]\(\s*(?P<target>[^)\s]+)(?:\s+\"[^\"]*\")?\s*\)"
)
#: [label]: target, a reference definition at the start of a line.
REF_DEF_RE = re.compile(r"^ {0,3}\[[^\]]+\]:\s*(?P<target>\S+)", re.MULTILINE)
HEADING_RE = re.compile(r"^ {0,3}(#{1,6})\s+(?P<text>.*?)\s*#*\s*$")
SCHEME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


def prose(text: str) -> list[str]:
    """The file's lines with fenced code blocks blanked, so their contents are neither links
    nor headings (line numbers stay)."""
    out, fence = [], ""
    for line in text.splitlines():
        match = FENCE_RE.match(line)
        if fence:
            if match and match.group(1)[0] == fence[0] and len(match.group(1)) >= len(fence):
                fence = ""
            out.append("")
        elif match:
            fence = match.group(1)
            out.append("")
        else:
            out.append(line)
    return out


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a heading (before the suffix of a repeated one)."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link's text only
    text = re.sub(r"<[^>]+>", "", text)  # inline HTML
    text = re.sub(r"[^\w\- ]", "", text.lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    found: set[str] = set()
    seen: dict[str, int] = {}
    for line in prose(path.read_text(encoding="utf-8")):
        match = HEADING_RE.match(line)
        if not match:
            continue
        base = github_anchor(match.group("text"))
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return found


def links(path: Path) -> list[str]:
    """Every link target of a Markdown file, outside code blocks and code spans."""
    text = "\n".join(prose(path.read_text(encoding="utf-8")))
    text = CODE_SPAN_RE.sub(lambda m: " " * len(m.group(0)), text)
    found = [m.group("target") for m in INLINE_LINK_RE.finditer(text)]
    found += [m.group("target") for m in REF_DEF_RE.finditer(text)]
    return found


def problem(page: Path, target: str, root: Path = ROOT) -> str | None:
    """Why a relative link of `page` does not hold, or None when it does (or is not relative)."""
    if SCHEME_RE.match(target) or target.startswith("//"):
        return None
    path_part, _, anchor = target.partition("#")
    if path_part.startswith("/"):
        return "an absolute path: write it relative to the page"
    dest = (page.parent / unquote(path_part) if path_part else page).resolve()
    shown = dest.relative_to(root) if dest.is_relative_to(root) else dest
    if not dest.is_relative_to(root):
        return f"{shown} is outside the repository"
    if not dest.exists():
        return f"{shown} does not exist"
    if not anchor:
        return None
    if dest.suffix.lower() != ".md":
        return f"#{anchor} points into {shown}, which is not Markdown"
    if unquote(anchor) not in anchors(dest):
        return f"no heading of {shown} gives #{anchor}"
    return None


def test_the_readme_is_a_newcomers_page() -> None:
    count = len(README.read_text(encoding="utf-8").splitlines())
    assert count <= MAX_README_LINES, (
        f"README.md: {count} lines, over {MAX_README_LINES}: move the detail to a page in docs/"
    )


def test_the_readme_starts_with_the_two_quick_start_commands() -> None:
    commands = [line.split("#")[0].strip() for line in _first_code_block(README) if line.strip()]
    assert commands[:2] == ["./scripts/bootstrap provision", "./scripts/bootstrap test"], commands


def _first_code_block(path: Path) -> list[str]:
    lines, inside = [], False
    for line in path.read_text(encoding="utf-8").splitlines():
        if FENCE_RE.match(line):
            if inside:
                return lines
            inside = True
        elif inside:
            lines.append(line)
    return lines


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO_ROOT)))
def test_every_relative_link_resolves(page: Path) -> None:
    broken = [
        f"{page.relative_to(REPO_ROOT)}: link {target}: {why}"
        for target in links(page)
        if (why := problem(page, target))
    ]
    assert not broken, "\n".join(broken)


def test_the_anchor_rule_is_githubs() -> None:
    assert github_anchor("No-op provisions: skipping what has not changed") == (
        "no-op-provisions-skipping-what-has-not-changed"
    )
    assert github_anchor("The front door (`settings.expose.front_door`)") == (
        "the-front-door-settingsexposefront_door"
    )
    assert github_anchor("Quick start (Debian 12, as root)") == "quick-start-debian-12-as-root"


def test_a_broken_link_is_named_with_its_problem(tmp_path) -> None:
    """The checker itself: a missing file, a missing heading, a repeated heading's suffix."""
    page = tmp_path / "page.md"
    page.write_text(
        "# Title\n\n## Part\n\n## Part\n\n```\n## Not a heading\n[x](gone.md)\n```\n\n"
        "[a](#part-1) [b](#not-a-heading) [c](other.md) `[d](gone.md)` [e](https://x.org/y)\n",
        encoding="utf-8",
    )
    assert links(page) == ["#part-1", "#not-a-heading", "other.md", "https://x.org/y"]
    root = tmp_path.resolve()
    page = page.resolve()
    assert problem(page, "#part-1", root) is None
    assert problem(page, "https://x.org/y", root) is None
    assert problem(page, "#not-a-heading", root) == "no heading of page.md gives #not-a-heading"
    assert problem(page, "other.md", root) == "other.md does not exist"
    assert problem(page, "../x.md", root) == f"{root.parent / 'x.md'} is outside the repository"
