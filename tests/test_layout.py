"""The layout's one rule (DESIGN "Layout"): imports run one way, upwards. common <- pipeline <- model
<- evaluation <- training and control (side by side, neither importing the other) <- the scripts
and bench/. Read from the source, so a new module is checked the day it is written; and importing
train.py stays light (no matplotlib or sklearn until a figure or a probe is made)."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LEVEL = {"common": 0, "pipeline": 1, "model": 2, "evaluation": 3, "training": 4, "control": 4,
         "train": 5, "extract": 5, "evaluate": 5, "play": 5, "bench": 6}


def project_modules() -> list[Path]:
    files = [ROOT / f"{name}.py" for name in ("train", "extract", "evaluate", "play")]
    return files + sorted(p for package in ("common", "pipeline", "model", "evaluation", "training", "control", "bench")
                          for p in (ROOT / package).rglob("*.py"))


def imported_packages(path: Path) -> set[str]:
    """The project's top-level names a module imports (at any depth of the file: a lazy import counts)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found & set(LEVEL)


@pytest.mark.parametrize("path", project_modules(), ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_run_one_way(path):
    home = path.relative_to(ROOT).parts[0].removesuffix(".py")
    upward = sorted(name for name in imported_packages(path)
                    if name != home and LEVEL[name] >= LEVEL[home])
    assert not upward, f"{path.relative_to(ROOT)} ({home}) imports {upward}: imports run common -> pipeline -> " \
                       f"model -> evaluation -> training | control -> scripts"


def test_the_rule_catches_an_upward_import(tmp_path):
    module = tmp_path / "bad.py"
    module.write_text("from training.config import TrainConfig\nimport pipeline.frames\n")
    assert imported_packages(module) == {"training", "pipeline"}


def test_importing_train_loads_no_plotting_or_probe_library():
    code = "import sys, train; print(sorted(m for m in ('matplotlib', 'sklearn') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
