"""`make gpu-check` on a machine that cannot run it (no torch, or torch without CUDA) says so in one
line and exits 2, instead of a traceback."""
from __future__ import annotations

import json
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
    assert_one_line_refusal(gpu_check(tmp_path, PYTHONPATH=f"{hidden}{os.pathsep}{ROOT}"), "cannot import torch")


# ------------------------------------------------------------------------------------ the stages
def test_every_stage_is_written_as_it_ends_and_a_failure_keeps_the_others(tmp_path):
    """A GPU session is short: a stage that fails leaves its first error line, what was measured before
    it is already on disk, and the stages after it still run."""
    from bench.gpu_check import Skipped, run_stages

    seen_on_disk = []

    def second():
        seen_on_disk.append(json.loads((tmp_path / "gpu-check.json").read_text())["stages"])
        raise RuntimeError("expected size 64==64, stride 8400==1 at dim=1\nand more lines")

    def skipped():
        raise Skipped("needs CUDA")

    results = run_stages([("first", lambda: {"rate": 1.0}), ("second", second), ("third", skipped),
                          ("fourth", lambda: {"rate": 4.0})], tmp_path, {"machine": "test box"})
    assert seen_on_disk == [{"first": {"rate": 1.0, "seconds": 0.0}}]
    stages = json.loads((tmp_path / "gpu-check.json").read_text())["stages"]
    assert stages == results["stages"]
    assert stages["second"]["error"] == "RuntimeError: expected size 64==64, stride 8400==1 at dim=1"
    assert stages["third"]["skipped"] == "needs CUDA" and stages["fourth"]["rate"] == 4.0
    markdown = (tmp_path / "gpu-check.md").read_text()
    assert "second: **failed**: RuntimeError: expected size 64==64" in markdown and "third: skipped (needs CUDA)" in markdown


def test_a_dry_run_on_the_cpu_runs_every_stage_that_needs_no_gpu(pair_shards, tmp_path):
    """Every stage's own code, small, on the CPU (the eager runs of train_speed at batch 8: the
    compiled step has its own test, tests/test_compile.py): a GPU session must not be the first to
    find that a stage cannot start."""
    from bench import gpu_check

    out = tmp_path / "check"
    code = gpu_check.main(["--device", "cpu", "--preset", "tiny", "--steps", "2", "--shards", str(pair_shards),
                           "--out", str(out), "--batches", "8", "--modes", "eager", "--probe-limit", "32"])
    stages = json.loads((out / "gpu-check.json").read_text())["stages"]
    assert code == 0, {name: result.get("error") for name, result in stages.items()}
    assert stages["cuda_tests"]["skipped"] == stages["dali_mixed_vs_cpu"]["skipped"] == "needs CUDA"
    assert list(stages["train_speed"]) == ["eager, batch 8", "seconds"]
    assert stages["train_speed"]["eager, batch 8"]["steps_per_s"] > 0
    assert stages["loss_curves"]["skipped"] == "needs both the eager and the compiled batch-32 runs"
    assert stages["extraction"]["same_bytes_at_batch_24"] and stages["extraction"]["seconds_to_first_shard"] > 0
    assert stages["evaluation"]["pairs"] > 0 and stages["rollout"]["frames_per_s"] > 0
    assert stages["batch_quality"]["skipped"] == "--quality not given"
