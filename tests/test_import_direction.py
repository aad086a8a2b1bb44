"""Dependencies point one way: models know nothing of files, data, training or serving, and
command-line modules are leaves. Imports are read from the source with `ast`."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# What each part of the library may not import (prefixes of module names).
FORBIDDEN = {
    "metamorph_jax/models": ("convert", "metamorph_jax.data", "metamorph_jax.training",
                             "metamorph_jax.inference", "metamorph_jax.evaluation",
                             "metamorph_jax.pretrained", "metamorph_jax.config_io"),
    "metamorph_jax/data": ("convert", "metamorph_jax.training", "metamorph_jax.inference",
                           "metamorph_jax.evaluation"),
    "metamorph_jax/training": ("metamorph_jax.inference", "metamorph_jax.evaluation"),
}
# Command-line modules: nothing in the library imports them.
CLI_MODULES = ("metamorph_jax.inference.text_cli", "metamorph_jax.inference.vpit_cli",
               "metamorph_jax.evaluation.score_cli", "metamorph_jax.evaluation.eval_cli",
               "metamorph_jax.data.encode", "metamorph_jax.findings.__main__",
               "convert.__main__")
# A command that lives in a lower layer for its name's sake (`python -m
# metamorph_jax.data.encode`, issue 13) may import the one library module that runs it; being
# a leaf (above), nothing in `data` can reach models through it.
LEAF_EXCEPTIONS = {"metamorph_jax/data/encode.py": ("metamorph_jax.inference.token_encoder",)}


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imported_modules(path: Path, root: Path) -> set[str]:
    """Every module `path` imports, relative imports resolved against its package."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module_name(path, root).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            found.add(module)
            # `from pkg import sub` may import a submodule
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return found


def violations(folder: Path, forbidden: tuple[str, ...], root: Path = REPO) -> list[str]:
    out = []
    for path in sorted(folder.rglob("*.py")):
        allowed = LEAF_EXCEPTIONS.get(path.relative_to(root).as_posix(), ())
        for module in sorted(imported_modules(path, root)):
            if any(module == ok or module.startswith(ok + ".") for ok in allowed):
                continue
            if any(module == bad or module.startswith(bad + ".") for bad in forbidden):
                out.append(f"{path.relative_to(root)} imports {module}")
    return out


@pytest.mark.parametrize("folder", sorted(FORBIDDEN))
def test_library_layers_import_downwards_only(folder):
    assert violations(REPO / folder, FORBIDDEN[folder]) == []


def test_command_line_modules_are_leaves():
    library = [REPO / "metamorph_jax", REPO / "convert"]
    found = [v for folder in library for v in violations(folder, CLI_MODULES)]
    assert found == []


def test_the_check_catches_a_planted_import(tmp_path):
    package = tmp_path / "metamorph_jax" / "models"
    package.mkdir(parents=True)
    (tmp_path / "metamorph_jax" / "__init__.py").write_text("")
    (package / "__init__.py").write_text("")
    (package / "clean.py").write_text("import jax\nfrom metamorph_jax.models import layers\n")
    assert violations(package, FORBIDDEN["metamorph_jax/models"], tmp_path) == []
    (package / "planted.py").write_text("from ..data import packing\n")
    (package / "planted2.py").write_text("import convert.llama\n")
    (package / "planted3.py").write_text("def f():\n    from metamorph_jax.training import losses\n")
    assert violations(package, FORBIDDEN["metamorph_jax/models"], tmp_path) == [
        "metamorph_jax/models/planted.py imports metamorph_jax.data",
        "metamorph_jax/models/planted.py imports metamorph_jax.data.packing",
        "metamorph_jax/models/planted2.py imports convert.llama",
        "metamorph_jax/models/planted3.py imports metamorph_jax.training",
        "metamorph_jax/models/planted3.py imports metamorph_jax.training.losses",
    ]
