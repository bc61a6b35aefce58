"""Every ```python block of README.md runs as written on a CPU-only machine.

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

README = Path(__file__).resolve().parents[1] / "README.md"
_BLOCK = re.compile(r"^```python\n(.*?)^```", re.DOTALL | re.MULTILINE)
_REQUIRES = re.compile(r"# requires: (.+)")


def python_blocks() -> list:
    return _BLOCK.findall(README.read_text(encoding="utf-8"))


def test_readme_has_the_blocks_it_should():
    blocks = python_blocks()
    assert len(blocks) >= 4
    assert any("diff_attention(q, k, v" in block for block in blocks)
    assert any("create_model_and_transforms" in block for block in blocks)
    assert any("replace_attention" in block for block in blocks)
    assert any("FusedDiffAttention" in block for block in blocks)


def test_readme_links_exist_and_stay_inside_the_repository():
    text = README.read_text(encoding="utf-8")
    assert "../shared" not in text
    for target in re.findall(r"\]\(([^)#]+)\)", text):
        if not target.startswith("http"):
            assert (README.parent / target).exists(), target
    assert "docs/kernel-math.md" in text


@pytest.mark.parametrize("index", range(len(python_blocks())))
def test_readme_block_runs_on_cpu(index, tmp_path):
    source = python_blocks()[index]
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
    assert result.returncode == 0, f"README block {index}:\n{source}\nstderr:\n{result.stderr}"
    assert "Traceback" not in result.stderr
