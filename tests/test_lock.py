"""One writer per output folder (common/lock.py): every stage that writes a folder (pack, extract,
evaluate, the controller's training, rollouts) takes its lock before its first look at it and
holds it to its last rename; a second writer is refused in one line naming the holder; a lock left
by a killed run is taken over; and a killed torchrun job leaves no rank running to write on."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from common.errors import UserError
from common.lock import FolderLock

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
HOLD = r"""
import sys, time
sys.path.insert(0, sys.argv[1])
from common.lock import FolderLock
FolderLock(sys.argv[3]).acquire()
print("held", flush=True)
time.sleep(600)
"""


def holder(folder: Path) -> subprocess.Popen:
    """Another process writing `folder` (its command line: `-c writer --out <folder>`), holding its lock."""
    process = subprocess.Popen([sys.executable, "-c", HOLD, str(ROOT), "--out", str(folder)],
                               stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "held"
    return process


def killed(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGKILL)
    process.wait(30)


def test_a_second_writer_is_refused_naming_the_holder_and_a_killed_ones_lock_is_taken_over(tmp_path, capsys):
    out = tmp_path / "out"
    first = holder(out)
    try:
        with pytest.raises(UserError) as refused:
            FolderLock(out).acquire()
        message = str(refused.value)
        assert message.startswith(f"--out {out}: another run is writing it (pid {first.pid} on "
                                  f"{socket.gethostname()} since ")
        assert f"--out {out}" in message.split("since", 1)[1]          # its command line
    finally:
        killed(first)                                                  # SIGKILL: no chance to let go
    with FolderLock(out), FolderLock(out):                             # the kernel let go; re-entrant
        assert f"taking over the lock left by pid {first.pid}" in capsys.readouterr().err
    assert not list(tmp_path.glob(".out.lock"))                        # a released lock leaves no file
    with FolderLock(out):
        assert capsys.readouterr().err == ""                           # nothing left over to take over


def test_a_forked_child_does_not_hold_its_parents_lock(tmp_path):
    """Worker pools fork: a child that outlives its parent (or is merely slow to exit) must not keep
    the folder locked."""
    out = tmp_path / "out"
    lock = FolderLock(out).acquire()
    child = os.fork()
    if child == 0:                                                     # the child: outlives the lock's release
        time.sleep(3)
        os._exit(0)
    try:
        lock.release()
        with FolderLock(out):                                          # free at once, the child still alive
            assert os.waitpid(child, os.WNOHANG) == (0, 0)
    finally:
        os.kill(child, signal.SIGKILL)                                 # not 3 s of waiting for it
        os.waitpid(child, 0)


def stage_runs(pair_shards, latent_dir, tiny_checkpoint, controller, out: Path) -> dict:
    import evaluate
    import extract
    import play
    from control import train as control_train
    from control import world_train
    from pipeline import pack

    return {
        "pack": lambda videos: pack.main(["--src", str(videos), "--out", str(out), "--no-progress"]),
        "extract": lambda _: extract.main(["--shards", str(pair_shards), "--checkpoint", str(tiny_checkpoint),
                                           "--out", str(out), "--backend", "torch", "--no-progress"]),
        "evaluate": lambda _: evaluate.main(["--shards", str(pair_shards), "--checkpoint", str(tiny_checkpoint),
                                             "--out", str(out), "--backend", "torch", "--no-progress"]),
        "controller": lambda _: control_train.main(["--latent", str(latent_dir), "--out", str(out), "--steps", "2"]),
        "world": lambda _: world_train.main(["--latent", str(latent_dir), "--checkpoint", str(tiny_checkpoint),
                                             "--controller", str(controller), "--out", str(out), "--steps", "2"]),
        "rollout": lambda _: play.main(["rollout", "--checkpoint", str(tiny_checkpoint), "--controller",
                                        str(controller), "--latent", str(latent_dir), "--out", str(out)]),
    }


@pytest.fixture(scope="module")
def controller(tmp_path_factory) -> Path:
    from control import Controller, ControllerConfig, save_controller

    return save_controller(tmp_path_factory.mktemp("controller") / "controller.pt",
                           Controller(ControllerConfig(channels=(4, 8, 8, 8, 8), hidden=16)).eval(), step=0)


@pytest.mark.parametrize("stage", ["pack", "extract", "evaluate", "controller", "world", "rollout"])
def test_every_stage_refuses_a_folder_another_run_is_writing(stage, videos, pair_shards, latent_dir,
                                                             tiny_checkpoint, controller, tmp_path, capsys):
    out = tmp_path / "out"
    run = stage_runs(pair_shards, latent_dir, tiny_checkpoint, controller, out)[stage]
    other = holder(out)
    try:
        capsys.readouterr()
        assert run(videos) == 2
        captured = capsys.readouterr()
        lines = captured.err.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in captured.err, captured.err
        assert lines[0].startswith(f"error: --out {out}: another run is writing it (pid {other.pid} on ")
        assert not out.exists()                                        # nothing looked at, nothing written
    finally:
        killed(other)


def test_a_pack_after_a_killed_writer_takes_its_lock_over(videos, tmp_path, capsys):
    from pipeline import pack

    out = tmp_path / "pairs"
    killed(holder(out))
    capsys.readouterr()
    assert pack.main(["--src", str(videos), "--out", str(out), "--no-progress"]) == 0
    assert "taking over the lock left by pid" in capsys.readouterr().err
    assert (out / "manifest.json").is_file()


def test_two_extractions_into_one_folder_at_once_do_not_both_succeed(pair_shards, tiny_checkpoint, tmp_path):
    """Two checkpoints' extractions started together into one --out both exited 0, and the folder
    held one checkpoint's shards. Now one of them is refused (by the lock, or, if it starts after the
    other finished, by the other checkpoint's latents), and what the folder holds is one
    checkpoint's, manifest and shards alike."""
    out = tmp_path / "latent"
    runs = [subprocess.Popen([sys.executable, "extract.py", "--shards", str(pair_shards), "--checkpoint", str(ckpt),
                              "--out", str(out), "--backend", "torch", "--no-progress", "--amp", "off"],
                             cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for ckpt in (tiny_checkpoint, tiny_checkpoint.parent / "step-000010.pt")]
    results = [(run.wait(600), run.stderr.read()) for run in runs]
    assert sorted(code for code, _ in results) == [0, 2], results
    refused = next(err for code, err in results if code == 2)
    assert "another run is writing it" in refused or "holds latents of another checkpoint" in refused
    made_by = json.loads((out / "manifest.json").read_text())["checkpoint"]["sha256"]
    assert {json.loads(p.read_text())["checkpoint"]["sha256"] for p in out.rglob("*.done.json")} == {made_by}


# ------------------------------------------------------------------------------------ torchrun
STALL_IN_A_SHARD = r"""
import os, runpy, sys, time
sys.path.insert(0, os.getcwd())
import pipeline.shards
def stall(*args, **kwargs):
    print(f"rank {os.environ['RANK']} writing", flush=True)
    time.sleep(3600)
pipeline.shards.TarShardWriter.add = stall
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def tagged_processes(tag: str) -> list[int]:
    """The processes whose environment holds `tag` (this test's torchrun and its ranks)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if tag.encode() in (entry / "environ").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def lines_of(process: subprocess.Popen) -> list[str]:
    """The lines `process` prints, gathered as they come by a thread (a list that grows)."""
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(line.strip() for line in process.stdout), daemon=True).start()
    return lines


def wait_for(condition, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def test_a_killed_torchrun_leaves_no_rank_running_and_the_rerun_can_write(pair_shards, tiny_checkpoint, tmp_path):
    """torchrun starts each rank in a session of its own, so `kill -9` of torchrun's process group
    left both ranks running (stalled here inside a shard write, as if slow), holding --out. Each
    rank now dies with torchrun; the folder is free for the rerun."""
    if not sys.platform.startswith("linux"):
        pytest.skip("the ranks follow torchrun through Linux's parent-death signal")
    script = tmp_path / "stall.py"
    script.write_text(STALL_IN_A_SHARD)
    out, tag = tmp_path / "latent", f"LAM_TEST_TAG={uuid.uuid4().hex}"
    extract = [str(ROOT / "extract.py"), "--shards", str(pair_shards), "--checkpoint", str(tiny_checkpoint),
               "--out", str(out), "--backend", "torch", "--no-progress", "--amp", "off"]
    env = {**ENV, tag.split("=")[0]: tag.split("=")[1]}
    job = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                            str(script), *extract], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    try:
        printed = lines_of(job)
        # the two ranks share one pipe, so their lines may run together: look in all that was printed
        assert wait_for(lambda: all(f"rank {rank} writing" in "".join(printed) for rank in (0, 1)), 300), printed
        assert len(tagged_processes(tag)) >= 3             # torchrun, its two ranks (and their loader workers)
        os.killpg(job.pid, signal.SIGKILL)                              # the job's process group, as a scheduler does
        job.wait(30)
        # gone at once (their loader workers notice within seconds); without the fix they never go
        assert wait_for(lambda: not tagged_processes(tag), 60), "ranks still running after torchrun was killed"
    finally:
        for pid in tagged_processes(tag):                               # without the fix: clean up
            os.kill(pid, signal.SIGKILL)
    rerun = subprocess.run([sys.executable, *extract], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
