"""The package's floors: each room imports only the rooms below it, so data flows one way
(checkpoint -> ONNX -> calibration set -> quantized ONNX -> engine -> runtime -> server)."""

from __future__ import annotations

import ast
from pathlib import Path

import qwen_image_trt

PACKAGE = Path(qwen_image_trt.__file__).parent
# room -> the rooms it may import. runtime never reads the build stage (compile, calibration): an engine
# folder's manifest is all it needs.
ALLOWED = {
    "core": set(),
    "models": {"core"},
    "calibration": {"core", "models"},
    "compile": {"core", "models", "calibration"},
    "runtime": {"core", "models"},
    "parity": {"core", "models", "runtime"},
    "serve": {"core", "models", "runtime"},
    "bench": {"core", "models", "runtime"},
    "quickstart": {"core", "models", "compile", "runtime", "parity"},
    "cli": {"core", "models", "calibration", "compile", "runtime", "parity", "serve", "bench", "quickstart"},
    "__init__": {"runtime"},
}


def _imports():
    for f in sorted(PACKAGE.rglob("*.py")):
        rel = f.relative_to(PACKAGE)
        room = rel.parts[0] if len(rel.parts) > 1 else rel.stem
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("qwen_image_trt."):
                target = node.module.split(".")[1]
                if target != room:
                    yield rel, room, target, node.lineno


def test_every_room_is_known():
    rooms = {p.name if p.is_dir() else p.stem for p in PACKAGE.iterdir()
             if (p.is_dir() and (p / "__init__.py").is_file()) or (p.suffix == ".py")}
    assert rooms == set(ALLOWED), "a new room needs its place in ALLOWED"


def test_rooms_import_only_rooms_below_them():
    bad = [f"{rel}:{line} ({room} imports {target})" for rel, room, target, line in _imports()
           if target not in ALLOWED[room]]
    assert not bad, "imports against the flow:\n" + "\n".join(bad)


def test_core_imports_no_heavy_framework_at_module_level():
    """core is imported by everything, the CLI included: torch, diffusers, onnx and friends load lazily."""
    heavy = {"torch", "diffusers", "transformers", "onnx", "onnx_ir", "onnxruntime", "modelopt", "tensorrt"}
    bad = []
    for f in sorted((PACKAGE / "core").glob("*.py")):
        for node in ast.parse(f.read_text()).body:
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
            bad += [f"{f.name}: {n}" for n in names if n.split(".")[0] in heavy]
    assert not bad, bad
