"""Where a measured figure came from, as every report records it: the code (git commit, and whether
the tree had uncommitted changes), the machine (CPU model and cores, the CPU flags that decide
precision and speed, the GPU if any), torch and Python, and what was measured (preset, variant,
precision) where the caller knows it. A number copied out of a report (the README's table,
`make readme-figures`) carries this with it, so a reader can tell a current figure from a stale one.

    from common.provenance import provenance, describe
    metrics["provenance"] = provenance(variant="default", preset="demo")
    describe(metrics["provenance"])   # 'commit 8ed341b; AMD EPYC, 2 cores, AVX2 only, no avx512_bf16 or AMX; no GPU; torch 2.13.0+cpu'
"""
from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
# The flags that change what a CPU figure means: AVX2 is the floor x86-64 torch builds use; AVX-512
# is faster; avx512_bf16 and AMX run bf16 natively (common/device.py: `--amp auto` uses bf16 only there).
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16")


def git_state(root: Path = ROOT) -> dict[str, Any]:
    """{"commit": full sha or None, "dirty": uncommitted changes to tracked files (None: unknown)}."""
    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {"commit": commit or None, "dirty": None if status is None else bool(status)}


def cpu_state(cpuinfo: str | None = None) -> dict[str, Any]:
    """{"model", "cores", "flags": the CPU_FLAGS it has, "simd": those in words}, from /proc/cpuinfo
    where there is one (`cpuinfo`: its text, for tests)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            cpuinfo = ""
    model = flags = None
    for line in cpuinfo.splitlines():
        if line.startswith("model name") and model is None:
            model = line.split(":", 1)[1].strip()
        elif line.startswith("flags") and flags is None:
            flags = [flag for flag in CPU_FLAGS if flag in line.split(":", 1)[1].split()]
    return {"model": model or platform.processor() or platform.machine() or "unknown", "cores": os.cpu_count(),
            "flags": flags, "simd": simd_words(flags)}


def simd_words(flags: list[str] | None) -> str:
    """The flags that matter here, in words: 'AVX2 only, no avx512_bf16 or AMX', 'native bf16: amx_bf16'."""
    if flags is None:
        return "CPU flags unknown"
    native = [flag for flag in ("amx_bf16", "avx512_bf16") if flag in flags]
    if native:
        return f"native bf16: {', '.join(native)}"
    if "avx512f" in flags:
        return "AVX-512, no avx512_bf16 or AMX"
    if "avx2" in flags:
        return "AVX2 only, no avx512_bf16 or AMX"
    return "no AVX2"


def gpu_name() -> str | None:
    """The first CUDA GPU's name, or None. Asks torch only once it is imported (a report's process
    has it), so this module stays light."""
    try:
        import torch
    except ImportError:
        return None
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


def torch_version() -> str | None:
    try:
        import torch
    except ImportError:
        return None
    return torch.__version__


def provenance(**known: Any) -> dict[str, Any]:
    """Where a report's figures come from, now: git state, machine, versions, and `known` (preset,
    variant, precision, ...; entries that are None are left out)."""
    return {**git_state(), "cpu": cpu_state(), "gpu": gpu_name(), "torch": torch_version(),
            "python": platform.python_version(), **{key: value for key, value in known.items() if value is not None}}


def describe(record: dict[str, Any] | None) -> str:
    """One line naming the commit and the machine of a provenance record (None: not recorded)."""
    if not record:
        return "source not recorded (a report from before provenance was recorded)"
    commit = record.get("commit")
    code = f"commit {commit[:7]}" if commit else "commit unknown"
    if record.get("dirty"):
        code += " with uncommitted changes"
    cpu = record.get("cpu") or {}
    machine = f"{cpu.get('model', 'unknown CPU')}, {cpu.get('cores', '?')} cores, {cpu.get('simd', 'CPU flags unknown')}"
    parts = [code, machine, record.get("gpu") or "no GPU"]
    if record.get("torch"):
        parts.append(f"torch {record['torch']}")
    return "; ".join(parts)
