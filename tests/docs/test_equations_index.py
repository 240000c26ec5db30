"""docs/equations.md: every function it names exists and its docstring cites the equation.

A row of the index reads ``| <paper> <eq.|Alg.|Sec.> <numbers> | statement | `dotted.name` | notes |``.
A docstring cites it when, for every listed number, the docstring holds a reference of that kind
(``eq. 6-7``, ``eq. 11, 29``, ``eq. 6 and 13``, ``Alg. 2-3``, ``Sec. 4``, ...) whose nearest
preceding paper name is that paper: "(Song et al. 2021, Alg. 4-5)" cites Score SDE's Alg. 4 and
5, "(DDIM eq. 12 with sigma from eq. 16)" DDIM's eq. 12 and 16.
"""

import importlib
import re
from pathlib import Path

import pytest

INDEX = Path(__file__).resolve().parents[2] / "docs" / "equations.md"

#: the names by which docstrings cite each paper (longest first where one contains another)
ALIASES = {
    "Improved DDPM": ["Improved DDPM", "Nichol & Dhariwal"],
    "DDPM": ["DDPM", "Ho et al. 2020", "Ho, Jain & Abbeel"],
    "DDIM": ["DDIM", "Song, Meng & Ermon"],
    "Score SDE": ["Song et al. 2021"],
    "NCSN": ["Song & Ermon 2019", "NCSN"],
}
_ALIAS_RE = re.compile("|".join(re.escape(a) for a in sorted((a for v in ALIASES.values() for a in v), key=len)[::-1]))
_PAPER_OF = {a: paper for paper, names in ALIASES.items() for a in names}
_NUM = r"\d+(?:\.\d+)?"
_LIST = rf"{_NUM}(?:\s*(?:-|–|,|and)\s*{_NUM})*"
_CITE_RE = re.compile(rf"\b(eqs?|alg|sec)\.\s*({_LIST})", re.IGNORECASE)
_ROW_RE = re.compile(rf"^({'|'.join(map(re.escape, ALIASES))}) (eq|Alg|Sec)\. ({_LIST})$")

#: what the issue asks the index to cover (it may hold more)
REQUIRED = (
    {("DDPM", "eq", n) for n in ("2", "4", "6", "7", "11", "14")}
    | {("DDPM", "alg", "1"), ("DDPM", "alg", "2")}
    | {("DDIM", "eq", "12"), ("DDIM", "eq", "16")}
    | {("Score SDE", "eq", n) for n in ("6", "9", "11", "12", "13", "29", "30", "39")}
    | {
        ("Score SDE", "alg", "2"),
        ("Score SDE", "alg", "3"),
        ("Improved DDPM", "eq", "15"),
        ("Improved DDPM", "sec", "4"),
    }
)


def _numbers(text: str) -> set:
    """'6-7, 11 and 15' -> {'6', '7', '11', '15'} (integer ranges expanded)."""
    out = set()
    for part in re.split(r"\s*(?:,|\band\b)\s*", text.strip()):
        rng = re.fullmatch(r"(\d+)\s*[-–]\s*(\d+)", part)
        if rng:
            out.update(str(k) for k in range(int(rng[1]), int(rng[2]) + 1))
        elif part:
            out.add(part)
    return out


def _kind(word: str) -> str:
    return {"eq": "eq", "eqs": "eq", "alg": "alg", "sec": "sec"}[word.lower()]


def index_rows():
    """[(paper, kind, {numbers}, dotted name)] from the tables of docs/equations.md."""
    rows = []
    for line in INDEX.read_text(encoding="utf-8").splitlines():
        if not line.startswith("|"):
            continue
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
        m = _ROW_RE.match(cells[0]) if cells else None
        if m is None:
            continue
        name = re.search(r"`(diffmath\.[\w.]+)`", cells[2])
        assert name, f"row {cells[0]!r} names no diffmath function in its third column: {line}"
        rows.append((m.group(1), _kind(m.group(2)), _numbers(m.group(3)), name.group(1)))
    return rows


def citations(doc: str) -> set:
    """{(paper, kind, number)} cited by a docstring: each reference goes to the paper named last
    before it."""
    doc = " ".join(doc.split())
    aliases = [(m.end(), _PAPER_OF[m.group(0)]) for m in _ALIAS_RE.finditer(doc)]
    out = set()
    for m in _CITE_RE.finditer(doc):
        before = [paper for end, paper in aliases if end <= m.start()]
        if before:
            out.update((before[-1], _kind(m.group(1)), n) for n in _numbers(m.group(2)))
    return out


def resolve(dotted: str):
    """The object at a dotted path: the longest importable module prefix, then attributes."""
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ModuleNotFoundError:
            continue
        for p in parts[i:]:
            obj = getattr(obj, p)
        return obj
    raise ImportError(dotted)


ROWS = index_rows()
IDS = [f"{p} {k}. {'-'.join(sorted(n))}" for p, k, n, _ in ROWS]


def test_the_index_covers_the_equations_it_promises():
    have = {(paper, kind, n) for paper, kind, nums, _ in ROWS for n in nums}
    assert not REQUIRED - have, sorted(REQUIRED - have)


def test_each_equation_maps_to_one_function():
    seen = {}
    for paper, kind, nums, name in ROWS:
        for n in nums:
            key = (paper, kind, n, name.startswith("diffmath.kernels."))
            assert seen.setdefault(key, name) == name, f"{paper} {kind}. {n} maps to {seen[key]} and {name}"


@pytest.mark.parametrize("paper, kind, nums, name", ROWS, ids=IDS)
def test_the_function_exists_and_cites_its_equation(paper, kind, nums, name):
    obj = resolve(name)
    assert callable(obj), name
    doc = obj.__doc__ or ""
    missing = {n for n in nums if (paper, kind, n) not in citations(doc)}
    assert not missing, f"{name}'s docstring does not cite {paper} {kind}. {sorted(missing)}:\n{doc}"


def test_the_citation_parser():
    ddpm = {("DDPM", "alg", "2")} | {("DDPM", "eq", n) for n in "6 7 11 15".split()}
    assert citations("(DDPM Alg. 2, eq. 6-7, 11, 15)") == ddpm
    assert citations("Improved DDPM's variance (Nichol & Dhariwal 2021, eq. 15)") == {("Improved DDPM", "eq", "15")}
    assert citations("(Improved DDPM, Sec. 4)") == {("Improved DDPM", "sec", "4")}
    assert citations("(DDIM eq. 12 with sigma from eq. 16); see DDPM") == {("DDIM", "eq", "12"), ("DDIM", "eq", "16")}
    assert citations("(Song et al. 2021, eq. 6 and 13)") == {("Score SDE", "eq", "6"), ("Score SDE", "eq", "13")}
    assert citations("eq. 4 without a paper") == set()
    assert ("DDPM", "eq", "1") not in citations("(DDPM eq. 14)") and ("DDPM", "eq", "14") in citations("(DDPM eq. 14)")
