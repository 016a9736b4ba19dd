"""Scaling out (README "Several GPUs, several machines"): the README's torchrun commands for
train.py, extract.py and evaluate.py, each on 2 ranks with gloo on the CPU, held against one
process's output. "One machine" is `torchrun --standalone --nproc_per_node=2`; "two machines" is two
torchrun agents of one process each meeting at a c10d rendezvous endpoint (here both on this host),
the command a user types on each machine."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from test_crash import assert_every_visible_shard_recorded, tree_bytes

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]        # what the `torchrun` command runs

# Runs a script with TarShardWriter.add wrapped so that its KILL_AT-th call on rank KILL_RANK SIGKILLs
# that rank alone (torchrun then stops the others): a crash inside one rank's shard write.
KILL_ONE_RANK = r"""
import os, runpy, signal, sys
# the project is on PYTHONPATH (tests/conftest.py)
if os.environ["RANK"] == os.environ["KILL_RANK"]:
    import pipeline.shards
    real, calls = pipeline.shards.TarShardWriter.add, []
    def add(*args, **kwargs):
        calls.append(None)
        if len(calls) == int(os.environ["KILL_AT"]):
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*args, **kwargs)
    pipeline.shards.TarShardWriter.add = add
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def one_machine(*command: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node=2 <command>`."""
    return subprocess.run([*TORCHRUN, "--standalone", "--nproc_per_node=2", *command], env=env or ENV,
                          capture_output=True, text=True, timeout=600)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def two_machines(*command: str) -> list[subprocess.CompletedProcess]:
    """What a user runs on each of two machines: `torchrun --nnodes=2 --nproc_per_node=1
    --rdzv-backend=c10d --rdzv-endpoint=HOST:PORT <command>`; one result per machine."""
    launcher = [*TORCHRUN, "--nnodes=2", "--nproc_per_node=1", "--rdzv-backend=c10d",
                f"--rdzv-endpoint=127.0.0.1:{free_port()}", "--rdzv-id=scale-out-test"]
    machines = [subprocess.Popen([*launcher, *command], env=ENV, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = []
    for machine in machines:
        stdout, stderr = machine.communicate(timeout=600)
        results.append(subprocess.CompletedProcess(machine.args, machine.returncode, stdout, stderr))
    return results


def output(*results: subprocess.CompletedProcess) -> str:
    return "".join(r.stdout + r.stderr for r in results)


# ------------------------------------------------------------------------------ train.py
def test_train_on_two_machines_resumes_where_it_stopped(pair_shards, tmp_path):
    """The README's multi-machine training command, and its --resume: a run stopped at step 2 and
    resumed to step 4 ends with the weights of the run that went straight to step 4 (every rank's
    loader position is in the checkpoint). Training on one machine: tests/test_train.py."""
    args = [str(ROOT / "train.py"), "--shards", str(pair_shards), "--preset", "tiny", "--out", str(tmp_path / "ckpt"),
            "--run-dir", str(tmp_path / "run"), "--iters", "4", "--no-compile", "--wandb", "disabled",
            "--set", "ckpt_every=2"]
    straight = two_machines(*args)
    assert [r.returncode for r in straight] == [0, 0], output(*straight)[-4000:]
    assert "identical on all 2 ranks" in output(*straight)
    last = tmp_path / "ckpt" / "step-000004.pt"
    want = torch.load(last, weights_only=True)
    assert want["world_size"] == 2
    last.unlink()                                        # as if stopped after step 2
    resumed = two_machines(*args, "--resume")
    assert [r.returncode for r in resumed] == [0, 0], output(*resumed)[-4000:]
    assert "resumed from step 2" in output(*resumed) and "not resumed exactly" not in output(*resumed)
    got = torch.load(last, weights_only=True)
    assert got["step"] == 4 and got["model"].keys() == want["model"].keys()
    assert all(torch.equal(got["model"][name], want["model"][name]) for name in want["model"]), \
        [name for name in want["model"] if not torch.equal(got["model"][name], want["model"][name])]


# ------------------------------------------------------------------------------ extract.py
def write_killer(tmp_path: Path) -> Path:
    path = tmp_path / "kill_one_rank.py"
    path.write_text(KILL_ONE_RANK)
    return path


def test_extract_killed_on_one_rank_then_rerun_on_two_machines_equals_one_process(pair_shards, tiny_checkpoint,
                                                                                  latent_dir, tmp_path):
    """Two ranks share the shards; one rank is killed inside a shard write; the re-run (as across two
    machines) makes only what is missing, and the result is byte for byte one process's: the same
    tars, indexes, records, .tar.zst copies and manifest, and no temp file left."""
    out = tmp_path / "latent"
    extract = [str(ROOT / "extract.py"), "--shards", str(pair_shards), "--checkpoint", str(tiny_checkpoint), "--out", str(out),
               "--batch-size", "24", "--backend", "torch", "--no-progress", "--zstd"]
    # rank 1's 40th pair is in its third shard (16 pairs a shard)
    killed = one_machine(str(write_killer(tmp_path)), *extract, env={**ENV, "KILL_RANK": "1", "KILL_AT": "40"})
    assert killed.returncode != 0, output(killed)[-4000:]
    assert not (out / "manifest.json").exists()
    assert_every_visible_shard_recorded(out)
    kept = {tar: tar.stat().st_mtime_ns for tar in out.rglob("latent-*.tar")}
    # round robin: rank 0 makes train shards 0, 2, 4, ..., rank 1 shards 1, 3, 5, ... (it died in 5).
    # How far rank 0 got before the launcher stopped it depends on the box's load (a busy one left
    # it inside shard 0 once): whatever it finished is kept, as the rerun checks below.
    assert {out / "train" / "latent-000001.tar", out / "train" / "latent-000003.tar"} <= set(kept)
    assert out / "train" / "latent-000005.tar" not in kept

    rerun = two_machines(*extract)
    assert [r.returncode for r in rerun] == [0, 0], output(*rerun)[-4000:]
    said = output(*rerun)
    total = len(list(latent_dir.rglob("latent-*.tar")))
    assert said.count("latents of checkpoint") == 1                        # rank 0 speaks for the run
    assert f"{total - len(kept)} shards written, {len(kept)} already done" in said
    assert all(tar.stat().st_mtime_ns == mtime for tar, mtime in kept.items())
    assert tree_bytes(out) == tree_bytes(latent_dir)


# ------------------------------------------------------------------------------ evaluate.py
def evaluate_args(pair_shards: Path, checkpoint: Path, latent: Path, out: Path) -> list[str]:
    # val holds 48 pairs: 3 batches of 16, so rank 0 scores one batch and rank 1 two
    return ["--shards", str(pair_shards), "--checkpoint", str(checkpoint), "--split", "val", "--out", str(out),
            "--latent", str(latent), "--batch-size", "16", "--backend", "torch", "--no-progress"]


@pytest.fixture(scope="module")
def one_process_report(pair_shards, tiny_checkpoint, latent_dir, tmp_path_factory) -> Path:
    import evaluate

    out = tmp_path_factory.mktemp("one-process") / "val"
    assert evaluate.main(evaluate_args(pair_shards, tiny_checkpoint, latent_dir, out)) == 0
    return out


def assert_same_numbers(mine, theirs, where: str = "metrics") -> None:
    """Equal, floats within rounding (sums reduced across ranks add in another order)."""
    if isinstance(theirs, dict):
        assert set(mine) == set(theirs), where
        for key in theirs:
            if key not in ("seconds", "pass_seconds", "timings"):       # how long, not what
                assert_same_numbers(mine[key], theirs[key], f"{where}.{key}")
    elif isinstance(theirs, list):
        assert len(mine) == len(theirs), where
        for i, (a, b) in enumerate(zip(mine, theirs)):
            assert_same_numbers(a, b, f"{where}[{i}]")
    elif isinstance(theirs, float):
        # ΔPSNR is a difference of two PSNRs near 30 dB: its rounding is theirs (~1e-6 x 30 dB), not a
        # millionth of a difference that a tiny model leaves near 0.2 dB (AVX2 kernels: 5e-7 dB apart)
        assert mine == pytest.approx(theirs, rel=1e-6, abs=1e-4 if where.endswith("delta_psnr") else 1e-9), where
    else:
        assert mine == theirs, where


def test_evaluate_on_two_machines_reports_what_one_process_does(pair_shards, tiny_checkpoint, latent_dir,
                                                                one_process_report, tmp_path):
    """Ranks score disjoint whole batches; the meters' sums are reduced (not their averages averaged),
    the pair-by-pair results gathered in split order: metrics.json equals one process's within float
    rounding, and the report and figures are the same. (Two machines only: the ranks and the reduction
    are the same under `--standalone`, whose launch the training and extraction tests run.)"""
    out = tmp_path / "val"
    command = [str(ROOT / "evaluate.py"), *evaluate_args(pair_shards, tiny_checkpoint, latent_dir, out)]
    results = two_machines(*command)
    assert all(r.returncode == 0 for r in results), output(*results)[-4000:]
    assert output(*results).count("report: ") == 1                          # rank 0 speaks for the run
    mine, theirs = (json.loads((d / "metrics.json").read_text()) for d in (out, one_process_report))
    assert mine["pairs"] == 48 and mine["actions"]["train_codes_from"] == "latent shards"
    assert_same_numbers(mine, theirs)
    assert (out / "report.md").read_text() == (one_process_report / "report.md").read_text()
    for figure in ("codebook_histogram", "reconstructions", "codes_by_event", "code_tsne"):
        assert (out / f"{figure}.png").read_bytes() == (one_process_report / f"{figure}.png").read_bytes(), figure
