"""Relative links in README.md and docs/*.md point at files that exist and, with a #fragment,
at a heading of that file (GitHub's anchor rule: lower case, punctuation dropped, spaces to -)."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def anchors(path: Path) -> set:
    out = set()
    in_code = False
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            in_code = not in_code
        m = None if in_code else re.match(r"#{1,6} (.+)", line)
        if m:
            text = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower())
            out.add(text.replace(" ", "-"))
    return out


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_relative_links_resolve(page):
    bad = []
    for target in LINK.findall(page.read_text(encoding="utf-8")):
        if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
            continue
        file, _, frag = target.partition("#")
        dest = (page.parent / file).resolve() if file else page
        if not dest.exists():
            bad.append(f"{target}: no file {dest.relative_to(ROOT) if dest.is_relative_to(ROOT) else dest}")
        elif frag and dest.suffix == ".md" and frag not in anchors(dest):
            bad.append(f"{target}: no heading #{frag} in {dest.name}")
    assert not bad, bad


# A path into this repository's tests (tests/<folder>/test_x.py, tests/reference/_ref.py, with an
# optional ::test_name); diffusers' own tests/schedulers/... that docs/diffusers.md cites are not ours.
TEST_PATH = re.compile(
    r"\btests/(?:(?:core|samplers|kernels|nn|pipeline|latent|integrations|docs|reference)/[A-Za-z_]\w*|(?:test_|_)\w*)\.py(?:::(\w+))?"
)
SOURCES = PAGES + sorted(p for d in ("diffmath", "kernels", "benchmarks", "tests") for p in (ROOT / d).rglob("*.py"))


def test_test_paths_named_in_docs_and_code_exist():
    bad = []
    for page in SOURCES:
        for m in TEST_PATH.finditer(page.read_text(encoding="utf-8")):
            path, name = m.group(0).partition("::")[0], m.group(1)
            dest = ROOT / path
            if not dest.is_file():
                bad.append(f"{page.relative_to(ROOT)}: {m.group(0)}: no file")
            elif name and not re.search(rf"^def {name}\b", dest.read_text(encoding="utf-8"), re.M):
                bad.append(f"{page.relative_to(ROOT)}: {m.group(0)}: no test {name}")
    assert not bad, bad
