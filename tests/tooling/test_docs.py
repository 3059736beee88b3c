"""The documentation: README.md and docs/*.md link only to files and headings that exist, no
page repeats a heading, the README stays a front page, and nothing in the repository cites a
Markdown file that the repository does not contain."""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))
README_MAX_LINES = 300

_LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
# Markdown files the code writes into its output folders (the GPU check's summary, the study's
# claims table): names of outputs, not citations of documentation.
GENERATED_MARKDOWN = {"summary.md", "claims.md"}
_FENCE = re.compile(r"^\s*(```|~~~)")


def _prose_lines(text: str) -> list[str]:
    """The lines outside fenced code blocks (whose '#' lines are comments, not headings)."""
    out, inside = [], False
    for line in text.splitlines():
        if _FENCE.match(line):
            inside = not inside
            continue
        if not inside:
            out.append(line)
    return out


def _headings(path: Path) -> list[str]:
    return [line.lstrip("#").strip() for line in _prose_lines(path.read_text())
            if re.match(r"^#{1,6} ", line)]


def github_anchor(heading: str) -> str:
    """The fragment GitHub gives a heading: lower case, punctuation dropped, spaces to '-'."""
    text = re.sub(r"`", "", heading).strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _links(path: Path) -> list[str]:
    links = []
    for line in _prose_lines(path.read_text()):
        line = re.sub(r"`[^`]*`", "", line)  # code spans are not links
        links += _LINK.findall(line)
    return links


def test_pages_exist():
    names = {p.name for p in PAGES}
    for page in ("maths.md", "api.md", "backends.md", "driver.md", "sharpness.md",
                 "benchmarks.md", "tests.md", "open_clip.md"):
        assert page in names, f"docs/{page} is missing"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_headings_unique(page: Path):
    heads = _headings(page)
    assert heads, f"{page.name} has no heading"
    dupes = sorted({h for h in heads if heads.count(h) > 1})
    assert not dupes, f"{page.relative_to(ROOT)} repeats headings {dupes}"
    anchors = [github_anchor(h) for h in heads]
    assert len(set(anchors)) == len(anchors), f"{page.name}: two headings share an anchor"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page: Path):
    checked, broken = 0, []
    for link in _links(page):
        if re.match(r"^[a-z][a-z0-9+.-]*:", link):  # http:, https:, mailto:
            continue
        target, _, fragment = link.partition("#")
        dest = (page.parent / target).resolve() if target else page
        checked += 1
        if not dest.exists():
            broken.append(f"{link} (no file {dest.relative_to(ROOT) if dest.is_relative_to(ROOT) else dest})")
            continue
        if fragment:
            if dest.suffix != ".md":
                broken.append(f"{link} (an anchor into a file that is not Markdown)")
            elif fragment not in {github_anchor(h) for h in _headings(dest)}:
                broken.append(f"{link} (no heading with anchor #{fragment} in {dest.name})")
    assert not broken, f"{page.relative_to(ROOT)}: broken links: {broken}"
    if page.name == "README.md":
        assert checked >= 8, "the README should link to the docs pages"


def test_readme_is_a_front_page():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines"
    linked = {Path(link.partition("#")[0]).name for link in _links(ROOT / "README.md")}
    for page in PAGES[1:]:
        assert page.name in linked, f"README.md does not link to docs/{page.name}"


def test_github_anchor():
    assert github_anchor("3. Geodesic multi-modal mixup (m^2-mix)") == \
        "3-geodesic-multi-modal-mixup-m2-mix"
    assert github_anchor("Outputs (`<run-dir>/sharpness/`)") == "outputs-run-dirsharpness"
    assert github_anchor("The training driver (robustft-train)") == \
        "the-training-driver-robustft-train"


def test_no_citation_of_missing_markdown():
    """Every Markdown file name that a tracked file mentions is a tracked file (docs must live
    in the repository)."""
    try:
        files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True,
                               check=True).stdout.decode().split("\0")
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"not a git checkout ({exc})")
    files = [f for f in files if f]
    have = {Path(f).name for f in files}
    missing: dict[str, list[str]] = {}
    for f in files:
        path = ROOT / f
        if not path.is_file():
            continue
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            continue
        for name in set(re.findall(r"[A-Za-z_-]+\.md\b", text)):
            if name not in have and name not in GENERATED_MARKDOWN:
                missing.setdefault(name, []).append(f)
    assert not missing, f"files cited but not in the repository: {missing}"
