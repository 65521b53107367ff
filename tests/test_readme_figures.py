"""The README's benchmark figures are the report's, quoted whole: no row edited, none left out.

README.md marks each quoted region ``<!-- quote: bench/results/<run>/report.md -->`` ...
``<!-- end quote -->``. Every line inside must occur verbatim in that report (headings may drop one
level: the report's ``## Targets`` is the README's ``### Targets``), and every table row and bullet of
the report's :data:`WHOLE_SECTIONS` must be inside (quoting a favourable subset is the defect this guards).
"""

from __future__ import annotations

import re
from pathlib import Path

from conftest import REPO_ROOT

README = REPO_ROOT / "README.md"
QUOTE = re.compile(r"<!-- quote: (?P<path>\S+) -->\n(?P<body>.*?)<!-- end quote -->", re.S)
# every table row and bullet of these report sections must be quoted (bench/cli.py reports: headline and
# targets; bench/isp_upstream_bench.py reports: results and the CPU/GPU target verdicts)
WHOLE_SECTIONS = ("## Headline", "## Targets", "## Results", "## CPU target", "## GPU target")


def quoted_regions(text: str) -> list[tuple[str, list[str]]]:
    """(report path, non-empty lines) of every quoted region of a README text."""
    return [(m["path"], [line for line in m["body"].splitlines() if line.strip()]) for m in QUOTE.finditer(text)]


def section_rows(report: str, heading: str) -> list[str]:
    """Table rows (``| ... |`` lines) and bullets of the report section that starts with ``heading``."""
    rows, inside = [], False
    for line in report.splitlines():
        if line.startswith("## "):
            inside = line.startswith(heading)
        elif inside and line.startswith(("|", "- ")):
            rows.append(line)
    return rows


def quote_problems(lines: list[str], report: str) -> list[str]:
    """What is wrong with quoting ``lines`` from ``report``: lines not in it, headline/target rows left out."""
    report_lines = set(report.splitlines())
    problems = [f"not in the report: {line!r}" for line in lines
                if line not in report_lines and line.replace("### ", "## ", 1) not in report_lines]
    quoted = set(lines)
    for heading in WHOLE_SECTIONS:
        problems += [f"left out of {heading}: {row!r}" for row in section_rows(report, heading) if row not in quoted]
    return problems


def test_readme_quotes_a_report_whole():
    regions = quoted_regions(README.read_text())
    assert regions, "README.md quotes no benchmark report (<!-- quote: bench/results/.../report.md --> markers)"
    for path, lines in regions:
        report = REPO_ROOT / path
        assert report.is_file(), f"README quotes {path}, which is not in the repository"
        problems = quote_problems(lines, report.read_text())
        assert not problems, f"README's quote of {path}:\n" + "\n".join(problems[:10])


def test_an_edited_or_selective_quote_is_caught():
    regions = quoted_regions(README.read_text())
    for path, lines in regions:
        report = (REPO_ROOT / path).read_text()
        rows = [i for i, line in enumerate(lines) if line.startswith("|") and re.search(r"\d", line)]
        assert rows, f"the quote of {path} has no table rows with figures"
        edited = list(lines)
        edited[rows[-1]] = re.sub(r"\d", lambda d: str((int(d.group()) + 1) % 10), edited[rows[-1]], count=1)
        assert any("not in the report" in p for p in quote_problems(edited, report)), path
        required = [(heading, row) for heading in WHOLE_SECTIONS for row in section_rows(report, heading)]
        assert required, f"{path} has none of the sections {WHOLE_SECTIONS}"
        heading, row = required[-1]
        selective = [line for line in lines if line != row]
        assert any(f"left out of {heading}" in p for p in quote_problems(selective, report)), path


def test_quoted_report_path_is_relative_to_the_checkout():
    for path, _ in quoted_regions(README.read_text()):
        assert not Path(path).is_absolute() and path.startswith("bench/results/"), path
