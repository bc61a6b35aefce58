"""Calls into the kernels' device helpers name their arguments: no call to a ``@triton.jit``
function of kernels/ passes more than six by position."""
from __future__ import annotations

import ast
from pathlib import Path

import diffattn.kernels

KERNELS = Path(diffattn.kernels.__file__).parent
MAX_POSITIONAL = 6


def _is_jit(node: ast.FunctionDef) -> bool:
    return any("jit" in ast.dump(d) for d in node.decorator_list)


def test_device_helper_calls_pass_at_most_six_positional_arguments():
    trees = {path: ast.parse(path.read_text()) for path in KERNELS.glob("*.py")}
    helpers = {node.name for tree in trees.values() for node in tree.body
               if isinstance(node, ast.FunctionDef) and _is_jit(node)}
    assert {"attention_scores", "attention_scores_grad", "score_visibility", "load_tile"} <= helpers
    too_many = [f"{path.name}:{node.lineno} {node.func.id} ({len(node.args)} positional)"
                for path, tree in trees.items() for node in ast.walk(tree)
                if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                and node.func.id in helpers and len(node.args) > MAX_POSITIONAL]
    assert not too_many, too_many
