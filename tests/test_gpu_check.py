"""`make gpu-check` on a machine that cannot run it (no torch, or torch without CUDA) says so in one
line and exits 2, instead of a traceback."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def gpu_check(tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bench.gpu_check", "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=120, env={**os.environ, **env})


def assert_one_line_refusal(proc: subprocess.CompletedProcess, says: str) -> None:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("gpu-check: needs torch with a CUDA GPU;"), proc.stderr
    assert says in lines[0] and sys.executable in lines[0] and "make gpu-check GPU_PY=" in lines[0]


@pytest.mark.skipif(torch.cuda.is_available(), reason="here the check would run")
def test_torch_without_cuda_is_one_line(tmp_path):
    assert_one_line_refusal(gpu_check(tmp_path), "sees no CUDA GPU")
    assert not (tmp_path / "out").exists()


def test_a_python_without_torch_is_one_line(tmp_path):
    hidden = tmp_path / "no-torch"                 # a `torch` that cannot be imported, found first
    (hidden / "torch").mkdir(parents=True)
    (hidden / "torch" / "__init__.py").write_text("raise ModuleNotFoundError(\"No module named 'torch'\")\n")
    assert_one_line_refusal(gpu_check(tmp_path, PYTHONPATH=str(hidden)), "cannot import torch")
