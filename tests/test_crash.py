"""A crash at any point loses nothing: real processes are SIGKILLed (the moment a checkpoint appears,
and inside checkpoint, shard and completion-record writes), the disk is checked right after each
kill, and a re-run must end exactly where an uninterrupted run ends."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

import train
from pipeline.shards import sha256_file

ROOT = Path(__file__).resolve().parents[1]

# Runs a script or module with one function wrapped so that its N-th call (counted per process)
# SIGKILLs the process: the crash lands exactly inside the write being tested. For os.replace only
# the renames onto a name ending in KILL_SUFFIX count.
KILLER = r"""
import os, runpy, signal, sys
target, at, what = os.environ["KILL_TARGET"], int(os.environ["KILL_AT"]), sys.argv[1]
suffix = os.environ.get("KILL_SUFFIX", ".pt")
calls = 0
def killing(real):
    def wrapper(*args, **kwargs):
        global calls
        if target != "os.replace" or str(args[1]).endswith(suffix):
            calls += 1
            if calls == at:
                os.kill(os.getpid(), signal.SIGKILL)
        return real(*args, **kwargs)
    return wrapper
if target == "os.replace":
    os.replace = killing(os.replace)
elif target == "os.fsync":
    os.fsync = killing(os.fsync)
else:
    import pipeline.shards
    pipeline.shards.TarShardWriter.add = killing(pipeline.shards.TarShardWriter.add)
sys.argv = sys.argv[1:]
if what.endswith(".py"):
    runpy.run_path(what, run_name="__main__")
else:
    sys.argv[0] = what
    runpy.run_module(what, run_name="__main__", alter_sys=True)
"""


def env(**extra: str) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", **extra}


def killed_inside(target: str, at: int, *command: str, suffix: str = ".pt") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", KILLER, *command], capture_output=True, text=True,
                          timeout=600, env=env(KILL_TARGET=target, KILL_AT=str(at), KILL_SUFFIX=suffix))


def killed_when_written(path: Path, *command: str) -> bool:
    """Run `command` and SIGKILL it the moment `path` appears. True when the kill landed (the run was
    still going), False when the run ended first (it must then have ended well)."""
    assert not path.exists(), f"{path} exists before the run: the kill would land at once"
    proc = subprocess.Popen([sys.executable, *command], env=env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 600
    while proc.poll() is None and not path.exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    code = proc.wait()
    assert code in (0, -signal.SIGKILL), code
    return code == -signal.SIGKILL


def assert_every_visible_shard_recorded(out: Path) -> None:
    """Right after a kill: every tar a reader can see (no hidden folder or name on its path) is whole
    and has its completion record: a latent shard its `.done.json` with the tar's sha256, a pair
    shard an entry in manifest.json with it. Temp files and staging folders are hidden."""
    manifest = out / "manifest.json"
    listed = {}
    if manifest.is_file():
        listed = {shard["file"]: shard["sha256"] for split in json.loads(manifest.read_text())["splits"].values()
                  for shard in split["shards"]}
    for tar in sorted(out.rglob("*.tar")):
        name = tar.relative_to(out).as_posix()
        if any(part.startswith(".") for part in tar.relative_to(out).parts):
            continue
        assert tar.with_suffix(".idx").is_file(), f"{name} has no .idx"
        if tar.name.startswith("latent-"):
            record = tar.with_name(tar.name.removesuffix(".tar") + ".done.json")
            assert record.is_file(), f"{name} is visible without its completion record"
            assert json.loads(record.read_text())["sha256"] == sha256_file(tar), f"{name} is not what its record says"
        else:
            assert listed.get(name) == sha256_file(tar), f"{name} is visible without a manifest entry for it"


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------ train.py
def train_args(shards: Path, root: Path, *extra: str) -> list[str]:
    return [str(ROOT / "train.py"), "--shards", str(shards), "--preset", "tiny", "--out", str(root / "ckpt"),
            "--run-dir", str(root / "run"), "--iters", "20", "--no-compile", "--wandb", "disabled",
            "--set", "ckpt_every=2", "--model", "vq-shift", "--set", "reset_every=3", *extra]


def assert_checkpoints_whole(ckpt: Path) -> None:
    """Every checkpoint a reader can see loads and holds the whole state."""
    for path in ckpt.glob("*.pt"):
        state = torch.load(path, weights_only=True)
        assert {"model", "optimizer", "scaler", "loader", "rng", "step", "config"} <= set(state), path


def test_train_killed_again_and_again_ends_bitwise_as_an_uninterrupted_run(pair_shards, tmp_path):
    assert train.main(train_args(pair_shards, tmp_path / "straight")[1:]) == 0
    root = tmp_path / "killed"
    resume = lambda: ["--resume"] if list((root / "ckpt").glob("step-*.pt")) else []   # noqa: E731
    # Two kills inside checkpoint writes (before the rename, then mid-file before its fsync) ...
    assert killed_inside("os.replace", 2, *train_args(pair_shards, root)).returncode == -9
    assert_checkpoints_whole(root / "ckpt")
    assert killed_inside("os.fsync", 3, *train_args(pair_shards, root, *resume())).returncode == -9
    assert_checkpoints_whole(root / "ckpt")
    # ... then a kill the moment a later checkpoint appears (the run is still going then: it lands),
    # and a last run to the end.
    assert killed_when_written(root / "ckpt" / "step-000010.pt", *train_args(pair_shards, root, *resume()))
    assert_checkpoints_whole(root / "ckpt")
    last = subprocess.run([sys.executable, *train_args(pair_shards, root, *resume())], env=env(),
                          capture_output=True, text=True, timeout=600)
    assert last.returncode == 0, last.stderr[-2000:]
    assert not list((root / "ckpt").glob(".*.tmp-*"))             # killed writes cleaned up
    straight = torch.load(tmp_path / "straight/ckpt/step-000020.pt", weights_only=True)
    resumed = torch.load(root / "ckpt/step-000020.pt", weights_only=True)
    for key, value in straight["model"].items():
        assert torch.equal(value, resumed["model"][key]), key
    for a, b in zip(straight["optimizer"]["state"].values(), resumed["optimizer"]["state"].values()):
        assert torch.equal(a["exp_avg"], b["exp_avg"]) and torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])
    assert straight["loader"] == resumed["loader"]


# ------------------------------------------------------------------------------ pack, extract
def test_pack_killed_mid_shard_and_rerun_is_byte_identical(videos, tmp_path):
    pack = ["-m", "pipeline.pack", "--src", str(videos), "--pairs-per-shard", "16", "--no-progress"]
    assert subprocess.run([sys.executable, *pack, "--out", str(tmp_path / "clean")], env=env(),
                          capture_output=True).returncode == 0
    out = tmp_path / "crashed"
    assert killed_inside("TarShardWriter.add", 40, *pack[1:], "--out", str(out)).returncode == -9   # in shard 3
    assert not (out / "manifest.json").exists()
    assert_every_visible_shard_recorded(out)
    assert subprocess.run([sys.executable, *pack, "--out", str(out)], env=env(),
                          capture_output=True).returncode == 0
    assert tree_bytes(out) == tree_bytes(tmp_path / "clean")


def test_extract_killed_mid_shard_and_rerun_is_byte_identical(pair_shards, tiny_checkpoint, tmp_path):
    extract = [str(ROOT / "extract.py"), "--shards", str(pair_shards), "--checkpoint", str(tiny_checkpoint),
               "--batch-size", "24", "--backend", "torch", "--no-progress"]
    run = lambda out: subprocess.run([sys.executable, *extract, "--out", str(out)], env=env(),  # noqa: E731
                                     capture_output=True, text=True)
    assert run(tmp_path / "clean").returncode == 0
    out = tmp_path / "crashed"
    assert killed_inside("TarShardWriter.add", 40, *extract, "--out", str(out)).returncode == -9   # in shard 3
    assert not (out / "manifest.json").exists()
    assert_every_visible_shard_recorded(out)
    # killed again between shard 3 being whole and its name: where a record written after the rename
    # would leave a visible tar without one
    assert killed_inside("os.replace", 1, *extract, "--out", str(out), suffix=".done.json").returncode == -9
    assert_every_visible_shard_recorded(out)
    last = run(out)
    assert last.returncode == 0, last.stderr
    assert "2 already done" in last.stdout                    # the finished shards were kept, not redone
    assert tree_bytes(out) == tree_bytes(tmp_path / "clean")
