"""Every ```python block of README.md and of the pages in docs/ runs as written on a CPU-only
machine, and every relative link of those pages points at a file of the repository.

Each block runs alone in a fresh interpreter, in an empty directory, the way a new user would
paste it: no GPU (CUDA_VISIBLE_DEVICES=""), no TRITON_INTERPRET. A block whose first line is
``# requires: <module>`` needs an optional package; it runs where that package is installed
and is skipped elsewhere (timm's block: CI has no timm).
"""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README] + sorted((ROOT / "docs").glob("*.md"))
_BLOCK = re.compile(r"^```python\n(.*?)^```", re.DOTALL | re.MULTILINE)
_REQUIRES = re.compile(r"# requires: (.+)")
_LINK = re.compile(r"\]\(([^)\s]+)\)")
README_MAX_LINES = 250


def python_blocks(page: Path) -> list:
    return _BLOCK.findall(page.read_text(encoding="utf-8"))


def _all_blocks() -> list:
    return [(page, index) for page in PAGES for index in range(len(python_blocks(page)))]


def _anchor(heading: str) -> str:
    """GitHub's anchor of a markdown heading: lower case, punctuation dropped, spaces to '-'."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(page: Path) -> set:
    text = _BLOCK.sub("", page.read_text(encoding="utf-8"))
    text = re.sub(r"^```.*?^```", "", text, flags=re.DOTALL | re.MULTILINE)
    return {_anchor(line.lstrip("#")) for line in text.splitlines() if line.startswith("#")}


def test_readme_is_a_front_door_that_links_the_manual():
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= README_MAX_LINES
    for page in PAGES[1:]:
        assert f"(docs/{page.name})" in text, f"README does not link {page.name}"
    blocks = python_blocks(README)
    assert any("diff_attention(q, k, v" in block for block in blocks)
    assert any("DiffMultiheadAttention(" in block for block in blocks)
    assert any("kv_cache=cache" in block for block in blocks)
    assert any("create_model_and_transforms" in block for block in blocks)


def test_the_manual_has_the_blocks_it_should():
    blocks = [block for page in PAGES for block in python_blocks(page)]
    for name in ("diff_attention_varlen(", "diff_attention_with_kvcache(", "replace_attention(",
                 "FusedDiffAttention", "retrieval_recall("):
        assert any(name in block for block in blocks), name


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.name)
def test_links_exist_and_stay_inside_the_repository(page):
    text = page.read_text(encoding="utf-8")
    assert "../shared" not in text
    for target in _LINK.findall(text):
        if target.startswith(("http://", "https://")):
            continue
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        assert linked.exists(), f"{page.name}: {target}"
        assert linked.is_relative_to(ROOT), f"{page.name}: {target}"
        if anchor and linked.suffix == ".md":
            assert anchor in _anchors(linked), f"{page.name}: {target}"


@pytest.mark.parametrize("page, index", _all_blocks(),
                         ids=[f"{page.name}-{index}" for page, index in _all_blocks()])
def test_block_runs_on_cpu(page, index, tmp_path):
    source = python_blocks(page)[index]
    first_line = source.splitlines()[0]
    required = _REQUIRES.fullmatch(first_line)
    if required:
        for module in required.group(1).split(","):
            pytest.importorskip(module.strip())
    env = {key: value for key, value in os.environ.items()
           if key not in ("TRITON_INTERPRET", "PYTHONWARNINGS")}
    env["CUDA_VISIBLE_DEVICES"] = ""
    result = subprocess.run([sys.executable, "-c", source], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{page.name} block {index}:\n{source}\nstderr:\n{result.stderr}"
    assert "Traceback" not in result.stderr
