"""User-facing text cites the paper and docs/, never a file users do not have.

An internal notes file once stood behind "FACTS §…" citations; users only have the paper (its
appendix sections, equations and tables) and ``docs/equations.md``. This test greps everything a
user reads: the package (docstrings, report text), the backends, the examples, the docs, the
suites, the READMEs and the committed reports.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STALE = re.compile(r"\bFACTS\b")
TEXT_SUFFIXES = {".py", ".md", ".yaml", ".yml", ".toml", ".cc", ".txt", ".json"}


def _user_facing_files():
    roots = ["epbench", "backends", "examples", "docs", "suites", "scripts", "benchmarks"]
    for name in roots:
        base = ROOT / name
        if base.is_dir():
            yield from (p for p in base.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
    yield from ROOT.glob("*.md")
    yield from (ROOT / "results").glob("*.md")
    yield from (ROOT / "results").glob("*/report.md")
    yield from (ROOT / "tests" / "data").rglob("*.md")


def test_no_citation_of_files_users_do_not_have():
    stale = []
    for path in _user_facing_files():
        if "__pycache__" in path.parts or ".egg-info" in str(path):
            continue
        for n, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            if STALE.search(line):
                stale.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert not stale, "stale references (cite the paper or docs/equations.md):\n" + "\n".join(stale)
