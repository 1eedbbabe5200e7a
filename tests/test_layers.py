"""The import layering, read from the code (ast), so that it stays true: imports run down the floors, never up, and
no trainer imports another trainer.

    0  textenv.models.*      the model floor: presets and loaders, lean GPT-2 paths, oneDNN linears, log-probs
    1  rewards.*             the reward protocol and adapters
    2  textenv.*             envs, tasks, generated data, tokenizer, file readers
    3  agents (shared)       core math, the run helper, sampler, data, forwards, distributed plumbing and sharding,
                             evaluation
    4  agents (trainers)     one file per stage; leaves: none imports another
    5  agents.pipeline, agents.cli, benchmarks.*   what runs the trainers
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("textenv", "rewards", "agents", "benchmarks")
TRAINERS = {"agents.pretrain", "agents.sft", "agents.comparisons", "agents.reward_model", "agents.ppo", "agents.grpo",
            "agents.rloo", "agents.dpo", "agents.sb3_lm", "agents.labeling"}
SHARED = {"agents", "agents.core", "agents.lora", "agents.run", "agents.data", "agents.sampler", "agents.distributed",
          "agents.sharding",
          "agents.policy", "agents.preferences", "agents.groups", "agents.best_of_n", "agents.report",
          "agents.evaluate", "agents.episodes", "agents.label_store"}
TOP = {"agents.pipeline", "agents.cli"}


def layer(module: str) -> int:
    if module == "textenv.models" or module.startswith("textenv.models."):
        return 0
    if module.split(".")[0] == "rewards":
        return 1
    if module.split(".")[0] == "textenv":
        return 2
    if module in SHARED:
        return 3
    if module in TRAINERS:
        return 4
    if module in TOP or module.split(".")[0] == "benchmarks":
        return 5
    raise AssertionError(f"{module} has no layer: add it to tests/test_layers.py (shared helper, trainer or top)")


def modules() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def project_imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import of a project module in `path`, at any depth (a function's lazy import too)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        found += [(node.lineno, name) for name in names if name.split(".")[0] in PACKAGES]
    return found


def test_the_layer_map_covers_every_module():
    for module in modules():
        layer(module)  # raises for a module nobody placed


@pytest.mark.parametrize("module", sorted(modules()))
def test_imports_run_down_and_trainers_are_leaves(module):
    here = layer(module)
    for line, imported in project_imports(modules()[module]):
        target = imported
        while target not in modules():  # `from textenv.models.gpt2 import X` names a module; a package's own too
            target = target.rsplit(".", 1)[0]
        assert layer(target) <= here, f"{module}:{line} imports {imported} (layer {layer(target)} above {here})"
        if module in TRAINERS:
            assert target not in TRAINERS or target == module, f"trainer {module}:{line} imports trainer {imported}"


def test_the_checker_sees_an_upward_and_a_sideways_import(tmp_path):
    """The test above can fail: it reads a lazy import inside a function, and it places what it reads."""
    source = tmp_path / "m.py"
    source.write_text("def f():\n    from agents.ppo import ppo\n    import rewards.hf\n")
    assert project_imports(source) == [(2, "agents.ppo"), (3, "rewards.hf")]
    assert layer("agents.ppo") > layer("rewards.hf") > layer("textenv.models.gpt2")
    assert layer("agents.grpo") == layer("agents.ppo") == 4
