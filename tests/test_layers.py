"""The layers of DESIGN.md hold: imports run downward only (core <- features <- pipeline).

The contract is read from the source with ``ast``, every ``import`` statement included (those
inside functions too), so a lazy import cannot hide an upward arrow. The planted-import tests
show that the check fails when an arrow points up.
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = "persona_geometry"
FEATURES = ("training", "eval", "analysis", "probes")
# Repository folder -> the import path the wheel gives it (pyproject's package-dir).
FOLDERS = {"persona_geometry": PACKAGE, **{f: f"{PACKAGE}.{f}" for f in FEATURES}}


def layer_of(module: str) -> tuple[str, str] | None:
    """Returns ``(layer, unit)`` of a project module: core, a feature (unit = its name), or pipeline."""
    parts = module.split(".")
    if parts[0] != PACKAGE:
        return None
    if len(parts) > 1 and parts[1] == "pipeline":
        return "pipeline", "pipeline"
    if len(parts) > 1 and parts[1] in FEATURES:
        return "feature", parts[1]
    return "core", "core"


def module_of(path: Path, root: Path) -> str:
    rel = path.relative_to(root).with_suffix("")
    parts = list(rel.parts)
    parts[0] = FOLDERS[parts[0]]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path, module: str) -> list[tuple[int, str]]:
    """Returns ``(line, imported module)`` for every import in the file, relative ones resolved."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            found.append((node.lineno, target))
            # ``from persona_geometry import training`` imports the subpackage.
            found += [(node.lineno, f"{target}.{alias.name}") for alias in node.names if layer_of(f"{target}.{alias.name}")]
    return found


def allowed(src: tuple[str, str], dst: tuple[str, str]) -> bool:
    (src_layer, src_unit), (dst_layer, dst_unit) = src, dst
    if src_layer == "pipeline":
        return True
    if src_layer == "feature":
        # A feature imports the core and itself; features never import each other.
        return dst_layer == "core" or dst_unit == src_unit
    return dst_layer == "core"


def _facade(module: str, target: str) -> bool:
    # The package root re-exports feature names lazily (PEP 562, a table of strings); its only
    # import statements of features sit under ``if TYPE_CHECKING:``, for type checkers.
    # test_package_root_loads_only_the_core checks that importing it loads no feature.
    return module == PACKAGE and layer_of(target)[0] == "feature"


def violations(root: Path) -> list[str]:
    """Returns one line per upward (or sideways) import in the tree at ``root``."""
    out = []
    for folder in FOLDERS:
        for path in sorted((root / folder).rglob("*.py")):
            module = module_of(path, root)
            src = layer_of(module)
            seen = set()
            for line, target in imports_of(path, module):
                dst = layer_of(target)
                if dst is not None and not allowed(src, dst) and not _facade(module, target) and line not in seen:
                    seen.add(line)  # one line per statement
                    out.append(f"{path.relative_to(root)}:{line}: {src[0]} {module} imports {dst[0]} {target}")
    return out


def test_imports_run_downward_only():
    assert violations(REPO) == []


def _copy_tree(tmp_path: Path) -> Path:
    for folder in FOLDERS:
        shutil.copytree(REPO / folder, tmp_path / folder, ignore=shutil.ignore_patterns("__pycache__"))
    return tmp_path


@pytest.mark.parametrize(
    ("file", "planted", "expected"),
    [
        # the core importing a feature, hidden inside a function
        ("persona_geometry/geometry.py", "def _f():\n    from persona_geometry.training import train_marker\n", "core persona_geometry.geometry imports feature"),
        # a feature importing the pipeline
        ("analysis/report.py", "import persona_geometry.pipeline.study\n", "feature persona_geometry.analysis.report imports pipeline"),
        # one feature importing another, through a relative import
        ("probes/linear.py", "from ..eval import source_rates\n", "feature persona_geometry.probes.linear imports feature persona_geometry.eval"),
        # the core reaching the pipeline through `from package import subpackage`
        ("persona_geometry/store.py", "from persona_geometry import pipeline\n", "imports pipeline persona_geometry.pipeline"),
    ],
)
def test_planted_upward_import_is_caught(tmp_path, file, planted, expected):
    root = _copy_tree(tmp_path)
    path = root / file
    path.write_text(path.read_text(encoding="utf-8") + "\n" + planted, encoding="utf-8")
    found = violations(root)
    assert len(found) == 1 and expected in found[0], found


def test_package_root_loads_only_the_core():
    code = (
        "import sys, persona_geometry as pg\n"
        "import persona_geometry.geometry, persona_geometry.extract, persona_geometry.store\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('vllm', 'peft', 'ray')"
        " or m.startswith(('persona_geometry.training', 'persona_geometry.eval', 'persona_geometry.probes',"
        " 'persona_geometry.analysis', 'persona_geometry.pipeline')))\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO.parent)
    assert out.stdout.strip() == ""


def test_public_names_resolve_lazily():
    import persona_geometry as pg

    for name in pg.__all__:
        assert getattr(pg, name) is not None, name
    assert pg.layer_sweep.__module__ == "persona_geometry.analysis.sweep"
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        pg.nope  # noqa: B018
