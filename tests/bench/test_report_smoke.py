"""The benchmark report machinery end to end at its smallest sizes, on a tiny random model.

    .venv/bin/python -m pytest tests/bench -q

Runs `python -m bench.run --smoke --model <tiny> --only floor multistep multi memory` (the floor with its
plot, one section served through a real `quiver serve` over gRPC with the PEFT peers, memory) into
a temporary directory, then checks the report's shape: the sections are there, their tables hold
finite numbers, each has a goal verdict line, and every linked figure is a readable PNG. Timings
on a tiny model mean nothing, so no goal is asserted, only that it was judged.
"""
from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.peft_factory import make_tiny_model, make_tiny_tokenizer

ROOT = Path(__file__).resolve().parents[2]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SECTIONS = {  # title prefix -> (table column that must be a positive number, plot name)
    "Floor": ("quiver step ms", "floor"),
    "Multistep:": ("multi-adapter ms", "multistep"),
    "Multi:": ("tokens/s", "multi"),
    "Memory": ("bytes", "memory"),
}


def split_sections(md: str) -> dict[str, str]:
    """'## Title' -> the text up to the next '## '."""
    parts = re.split(r"^## (.+)$", md, flags=re.M)
    return {parts[i].strip(): parts[i + 1] for i in range(1, len(parts), 2)}


def tables(text: str) -> list[tuple[list[str], list[list[str]]]]:
    """Every markdown table in text: (header cells, rows of cells)."""
    found = []
    for block in re.split(r"\n\s*\n", text):
        lines = [ln for ln in block.strip().splitlines() if ln.startswith("|")]
        if len(lines) >= 2 and set(lines[1]) <= set("|-: "):
            cells = [[c.strip() for c in ln.strip().strip("|").split("|")] for ln in lines]
            found.append((cells[0], cells[2:]))
    return found


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> tuple[Path, str]:
    model_dir = tmp_path_factory.mktemp("tiny-model")
    make_tiny_model("llama", seed=0).save_pretrained(str(model_dir))
    make_tiny_tokenizer(model_dir)
    out = tmp_path_factory.mktemp("results")
    cmd = [sys.executable, "-m", "bench.run", "--smoke", "--model", str(model_dir),
           "--only", "floor", "multistep", "multi", "memory", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (path,) = out.glob("*.md")
    return path, path.read_text()


pytestmark = pytest.mark.slow


def test_header_carries_command_machine_and_versions(report):
    _, md = report
    head = md.split("\n## ", 1)[0]
    assert head.startswith("# Quiver benchmark report (smoke)")
    for field in ("- date, machine:", "- versions:", "- model:", "- command: `python -m bench.run"):
        assert field in head
    assert re.search(r"torch \d", head) and re.search(r"\d{4}-\d\d-\d\d", head)


@pytest.mark.parametrize("prefix", SECTIONS)
def test_section_has_numbers_and_a_verdict(report, prefix):
    _, md = report
    sections = split_sections(md)
    matches = [title for title in sections if title.startswith(prefix)]
    assert matches, f"no '## {prefix}...' section in {list(sections)}"
    text = sections[matches[0]]
    header, rows = tables(text)[0]
    column = header.index(SECTIONS[prefix][0])
    values = [float(row[column]) for row in rows]
    assert values and all(math.isfinite(v) and v > 0 for v in values), (header, rows)
    verdicts = re.findall(r"^- Goal .+: \*\*(met|missed|not measured)\*\*", text, flags=re.M)
    assert verdicts, text


def test_multi_has_peft_peers_and_ratios(report):
    _, md = report
    text = next(t for title, t in split_sections(md).items() if title.startswith("Multi:"))
    (header, rows), (peft_header, peft) = tables(text)[:2]
    loads = [row[0] for row in rows]
    assert loads[0] == "base" and "1 adapters" in loads and "2 adapters" in loads
    assert float(rows[0][header.index("x base")]) == pytest.approx(1.0)
    assert peft_header[0] == "PEFT" and [r[0].split(" ")[0] for r in peft] == ["mixed", "one"]
    assert all(float(r[peft_header.index("tokens/s")]) > 0 for r in peft)


def test_figures_are_readable_pngs(report):
    import matplotlib.image

    path, md = report
    links = re.findall(r"!\[([^\]]+)\]\(([^)]+)\)", md)
    assert {name for name, _ in links} >= {plot for _, plot in SECTIONS.values()}
    for _, file in links:
        png = path.parent / file
        assert png.read_bytes()[:8] == PNG_MAGIC, file
        image = matplotlib.image.imread(png)
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
