"""The import layering of DESIGN.md: a module imports only from its own package or lower layers (function-level
imports included), and the packages of one layer (models, tokenizers, samplers) do not import each other."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "genvis"
LAYERS = {
    "errors": 0, "registry": 0, "io": 0, "precision": 0, "shards": 0,
    "diffusion": 1, "data": 1,
    "models": 2, "tokenizers": 2, "samplers": 2,
    "generate": 3, "config": 3,
    "training": 4,
    "evaluation": 5,
    "cli": 6,
}


def imported_packages(path: Path):
    """The top-level genvis packages a module imports (at module or function level)."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("genvis.") and node.level == 0:
            yield node.module.split(".")[1], node.lineno
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("genvis."):
                    yield alias.name.split(".")[1], node.lineno


def test_every_module_imports_only_its_own_layer_or_lower():
    bad = []
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT)
        if rel.parts == ("__init__.py",) or rel.parts == ("__main__.py",):
            continue  # the package's lazy top-level API and `python -m genvis`
        own = rel.parts[0].removesuffix(".py")
        assert own in LAYERS, f"{rel}: not in the layer table"
        for package, line in imported_packages(path):
            if package == own:
                continue
            if LAYERS[package] > LAYERS[own] or (LAYERS[package] == LAYERS[own] and LAYERS[own] > 0):
                bad.append(f"{rel}:{line} imports genvis.{package}")
    assert bad == []
