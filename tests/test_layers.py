"""Layers import downward only, and no trainer module imports another method's module.

Every module's imports are read with ``ast`` (top-level, function-level and ``TYPE_CHECKING`` ones
alike, since a lazy import is still a dependency), so the check needs no import of the package.

The layers, lowest first (a package may import its own modules and any lower layer; peers on one
level may not import each other):

    errors
    ops
    losses
    models, data                  peers: model code and the data path know nothing of each other
    rollout, rewards, tasks, report
                                  peers: generation, scoring, embedded tasks, and the metrics log /
                                  plots / run report / completions table that trainers and eval write
    trainers, eval                peers: eval runs trained models; trainers never run an eval suite
    cli
    scripts, posttrain (the package root, lazy public names), posttrain.__main__
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import posttrain

PACKAGE_DIR = Path(posttrain.__file__).parent

LAYERS: list[set[str]] = [
    {"errors"},
    {"ops"},
    {"losses"},
    {"models", "data"},
    {"rollout", "rewards", "tasks", "report"},
    {"trainers", "eval"},
    {"cli"},
    {"scripts", "root"},
]
RANK = {package: rank for rank, packages in enumerate(LAYERS) for package in packages}

#: names the package root defines itself (not lazily from a submodule): importing them depends on nothing
ROOT_OWN_NAMES = {"__version__"}

#: (importing module, imported module) pairs that break the layering on purpose, with the reason.
#: Only lazy imports used purely for a type hint belong here; anything else moves down a layer.
ALLOWED: dict[tuple[str, str], str] = {}

#: modules under posttrain/trainers/ that hold one method's Trainer
METHOD_MODULES = {"sft", "reward", "dpo", "grpo", "rloo", "ppo", "online_dpo"}
#: helper modules of one family of methods, and the trainer modules allowed to import them; every other
#: non-method module (base, config, reference, guard, checkpoint, health, online_checkpoint) is shared
FAMILY_HELPERS = {
    "online": {"grpo", "rloo"},  # the sampling/buffering loop GRPO and RLOO share
    "online_config": {"online", "grpo", "rloo"},
    "ppo_config": {"ppo"},
    "ppo_checkpoint": {"ppo"},
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(path: Path) -> list[tuple[str, int]]:
    """``(module, line)`` of every ``posttrain`` import in the file; ``from posttrain import X`` names ``X``'s home."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target == "posttrain":  # the root: each name lives in a submodule, or in the root itself
                for alias in node.names:
                    if alias.name in ROOT_OWN_NAMES:
                        continue
                    home = posttrain._EXPORTS.get(alias.name, f"posttrain.{alias.name}")
                    found.append((home, node.lineno))
            else:
                found.append((target, node.lineno))
    return [(module, line) for module, line in found if module == "posttrain" or module.startswith("posttrain.")]


def layer_of(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1 or parts[1] == "__main__":
        return "root"
    return parts[1]


def all_modules() -> list[Path]:
    return sorted(PACKAGE_DIR.rglob("*.py"))


def test_every_package_has_a_layer():
    packages = {layer_of(module_name(path)) for path in all_modules()}
    assert packages <= set(RANK), f"give these packages a layer in LAYERS: {sorted(packages - set(RANK))}"


def test_layers_import_downward_only():
    violations = []
    for path in all_modules():
        importer = module_name(path)
        own = layer_of(importer)
        for imported, line in imported_modules(path):
            target = layer_of(imported)
            if target == own or (importer, imported) in ALLOWED:
                continue
            if RANK[target] >= RANK[own]:
                kind = "a peer" if RANK[target] == RANK[own] else "a higher layer"
                violations.append(f"{importer} (line {line}) imports {imported}: {own} -> {target} is {kind}")
    assert not violations, "imports against the layering:\n" + "\n".join(violations)


def test_no_trainer_module_imports_another_methods_module():
    violations = []
    for path in sorted((PACKAGE_DIR / "trainers").glob("*.py")):
        importer = path.stem
        for imported, line in imported_modules(path):
            if not imported.startswith("posttrain.trainers."):
                continue
            target = imported.split(".")[2]
            if target == importer:
                continue
            if target in METHOD_MODULES:
                violations.append(f"trainers/{importer}.py (line {line}) imports the method module trainers/{target}.py")
            elif target in FAMILY_HELPERS and importer not in FAMILY_HELPERS[target]:
                violations.append(f"trainers/{importer}.py (line {line}) imports trainers/{target}.py, which only "
                                  f"{', '.join(sorted(FAMILY_HELPERS[target]))} may use")
    assert not violations, "move what is shared down a layer:\n" + "\n".join(violations)


def test_the_checks_see_function_level_and_relative_imports(tmp_path, monkeypatch):
    """The parser itself: a lazy import inside a function and a relative import are both found."""
    package = tmp_path / "posttrain"
    (package / "models").mkdir(parents=True)
    source = "def f():\n    from posttrain.trainers.base import x\n\nfrom ..rollout import engine\n"
    (package / "models" / "thing.py").write_text(source)
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE_DIR", package)
    found = imported_modules(package / "models" / "thing.py")
    assert ("posttrain.trainers.base", 2) in found
    assert ("posttrain.rollout", 4) in found
