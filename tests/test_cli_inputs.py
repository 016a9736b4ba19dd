"""What every command line does with a bad file it is pointed at: a junk checkpoint (of many kinds) or
an output path that is a file is one `error:` line naming it and exit 2, before any work; and a
checkpoint's identity is the hash of the very bytes its weights were loaded from."""
from __future__ import annotations

import hashlib
import io
import os
import random
import shutil
import zipfile
from pathlib import Path

import pytest
import torch

from common.errors import UserError
import evaluate
import extract
import play
import train
from control import Controller, ControllerConfig, load_controller, save_controller
from control import train as control_train
from evaluation import run as evaluation_run
from model import load_checkpoint, read_checkpoint
from model import extraction
from model.inference import load_model
import pipeline.pack as pack
import pipeline.record as record


# ------------------------------------------------------------------------------------ junk
def junk_bytes(real_checkpoint: Path) -> dict[str, bytes]:
    """Files a user may point --checkpoint at by mistake. Text starting with `h` or `a` is read by
    torch's pickle reader as opcodes (KeyError, IndexError), not as a bad magic number."""
    listing = io.BytesIO()
    torch.save([1, 2, 3], listing)
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as zipped:
        zipped.writestr("notes.txt", "a zip archive that torch did not write")
    real = real_checkpoint.read_bytes()
    return {"hello": b"hello\n", "csv": b"a,b\n1,2\n", "empty": b"",
            "random": random.Random(0).randbytes(4096), "zip": archive.getvalue(),
            "truncated": real[: len(real) // 2], "list": listing.getvalue()}


JUNK = ["hello", "csv", "empty", "random", "zip", "truncated", "list"]


@pytest.fixture(scope="module")
def junk_dir(tiny_checkpoint, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("junk")
    for name, data in junk_bytes(tiny_checkpoint).items():
        (folder / f"{name}.pt").write_bytes(data)
    return folder


@pytest.fixture(scope="module")
def controller_path(tmp_path_factory) -> Path:
    controller = Controller(ControllerConfig(channels=(4, 8, 8, 8, 8), hidden=16, action_dim=8)).eval()
    return save_controller(tmp_path_factory.mktemp("controller") / "controller.pt", controller, step=0)


def one_error_line(capsys) -> str:
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in captured.err, captured.err
    return lines[0]


@pytest.mark.parametrize("junk", JUNK)
def test_every_checkpoint_reader_names_a_junk_file(junk, junk_dir):
    path = junk_dir / f"{junk}.pt"
    for reader in (read_checkpoint, load_checkpoint, load_controller):
        with pytest.raises(UserError) as raised:
            reader(path)
        message = str(raised.value)
        assert message.startswith(f"{path}: ") and "\n" not in message, message


@pytest.mark.parametrize("junk", JUNK)
def test_every_cli_given_a_junk_checkpoint_says_so_in_one_line(junk, junk_dir, pair_shards, latent_dir,
                                                               tiny_checkpoint, controller_path, tmp_path, capsys):
    path = str(junk_dir / f"{junk}.pt")
    out = str(tmp_path / "out")
    runs = {
        "extract": lambda: extract.main(["--shards", str(pair_shards), "--checkpoint", path, "--out", out,
                                         "--no-progress"]),
        "evaluate": lambda: evaluate.main(["--shards", str(pair_shards), "--checkpoint", path, "--out", out,
                                           "--no-progress"]),
        "rollout, LAM": lambda: play.main(["rollout", "--checkpoint", path, "--controller", str(controller_path),
                                           "--latent", str(latent_dir), "--out", out]),
        "rollout, controller": lambda: play.main(["rollout", "--checkpoint", str(tiny_checkpoint), "--controller",
                                                  path, "--latent", str(latent_dir), "--out", out]),
    }
    for name, run in runs.items():
        assert run() == 2, name
        assert path in one_error_line(capsys), name
    # train.py --resume reads the latest step file in --out
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    shutil.copy(path, ckpt / "step-000004.pt")
    assert train.main(["--shards", str(pair_shards), "--out", str(ckpt), "--run-dir", str(tmp_path / "run"),
                       "--resume", "--no-compile", "--wandb", "disabled"]) == 2
    assert str(ckpt / "step-000004.pt") in one_error_line(capsys)
    # `play.py serve` starts anyway and its page says what is wrong
    for paths in ({"checkpoint": Path(path), "controller": controller_path},
                  {"checkpoint": tiny_checkpoint, "controller": Path(path)}):
        game, problem = play.build_game(play.ServeConfig(**paths, latent=latent_dir))
        assert game is None and problem.startswith(f"{path}: ") and "\n" not in problem


# ------------------------------------------------------------------------------------ identity
def load_then_replace(monkeypatch, path: Path, replacement: bytes) -> None:
    """The first torch.load of the run is followed by `path` being replaced (atomically, as a
    trainer saving a new best.pt does) before the caller can look at the file again."""
    real_load, calls = torch.load, []

    def loading(*args, **kwargs):
        state = real_load(*args, **kwargs)
        if not calls:
            calls.append(1)
            staged = path.with_name(".replacement")
            staged.write_bytes(replacement)
            os.replace(staged, path)
        return state

    monkeypatch.setattr(torch, "load", loading)


def test_checkpoint_identity_is_the_hash_of_the_bytes_loaded(tiny_checkpoint, tmp_path, monkeypatch):
    best = tmp_path / "best.pt"
    shutil.copy(tiny_checkpoint, best)
    loaded_bytes = best.read_bytes()
    load_then_replace(monkeypatch, best, (tiny_checkpoint.parent / "step-000010.pt").read_bytes())
    lam, identity = load_model(best, torch.device("cpu"))
    assert identity.step == lam.step == 20
    assert identity.sha256 == hashlib.sha256(loaded_bytes).hexdigest() != hashlib.sha256(best.read_bytes()).hexdigest()


def test_play_checks_the_controller_against_the_lam_it_loaded(tiny_checkpoint, latent_dir, tmp_path, monkeypatch):
    best = tmp_path / "best.pt"
    shutil.copy(tiny_checkpoint, best)
    controller = Controller(ControllerConfig(channels=(4, 8, 8, 8, 8), hidden=16, action_dim=8)).eval()
    lam = {"sha256": hashlib.sha256(best.read_bytes()).hexdigest(), "step": 20}
    controller_path = save_controller(tmp_path / "controller.pt", controller, step=0, lam=lam)
    paths = play.ModelPaths(checkpoint=best, controller=controller_path, latent=latent_dir)
    load_then_replace(monkeypatch, best, (tiny_checkpoint.parent / "step-000010.pt").read_bytes())
    sim, _ = play.load_simulator(paths)
    assert play.controller_made_for_lam(paths, sim) is None   # the LAM it loaded is the one the controller knows


# ------------------------------------------------------------------------------------ outputs
class WorkStarted(AssertionError):
    """Raised by a stand-in for a command's first real work: the output check came too late."""


def refuse_work(monkeypatch, module, name: str) -> None:
    def started(*args, **kwargs):
        raise WorkStarted(f"{module.__name__}.{name} ran before the output path was checked")

    monkeypatch.setattr(module, name, started)


@pytest.fixture
def a_file(tmp_path) -> Path:
    path = tmp_path / "not-a-folder"
    path.write_text("a user's file\n")
    return path


@pytest.mark.parametrize("under", [False, True], ids=["is-a-file", "under-a-file"])
@pytest.mark.parametrize("command", ["train --out", "train --run-dir", "train --resume --out", "extract", "evaluate",
                                     "pack", "record", "control.train", "play rollout", "play bench"])
def test_an_output_path_that_is_a_file_is_refused_before_any_work(command, under, a_file, pair_shards, videos,
                                                                   latent_dir, tiny_checkpoint, tmp_path,
                                                                   monkeypatch, capsys):
    target = str(a_file / "sub" if under else a_file)
    free = str(tmp_path / "free")
    tiny = ["--shards", str(pair_shards), "--preset", "tiny", "--no-compile", "--wandb", "disabled"]
    models = ["--checkpoint", str(tiny_checkpoint), "--controller", str(a_file.parent / "c.pt"),
              "--latent", str(latent_dir)]
    work = {"train": (train, "setup_runtime"), "extract": (extraction, "load_model"),
            "evaluate": (evaluation_run, "load_model"), "pack": (pack, "list_episodes"),
            "record": (record, "record_episode"), "control.train": (control_train, "train"),
            "play": (play, "load_simulator")}
    runs = {
        "train --out": lambda: train.main([*tiny, "--out", target, "--run-dir", free]),
        "train --run-dir": lambda: train.main([*tiny, "--out", free, "--run-dir", target]),
        "train --resume --out": lambda: train.main(["--out", target, "--resume"]),
        "extract": lambda: extract.main(["--shards", str(pair_shards), "--checkpoint", str(tiny_checkpoint),
                                         "--out", target]),
        "evaluate": lambda: evaluate.main(["--shards", str(pair_shards), "--checkpoint", str(tiny_checkpoint),
                                           "--out", target]),
        "pack": lambda: pack.main(["--src", str(videos), "--out", target]),
        "record": lambda: record.main(["--out", target, "--episodes", "1", "--max-steps", "4"]),
        "control.train": lambda: control_train.main(["--latent", str(latent_dir), "--out", target]),
        "play rollout": lambda: play.main(["rollout", *models, "--out", target]),
        "play bench": lambda: play.main(["bench", *models, "--out", target]),
    }
    refuse_work(monkeypatch, *work[command.split()[0]])
    if command == "play bench":
        refuse_work(monkeypatch, play, "build_game")
    assert runs[command]() == 2
    line = one_error_line(capsys)
    assert target in line and ("--run-dir" if command == "train --run-dir" else "--out") in line
    assert "not a directory" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["not-a-folder"]      # nothing made, not even --run-dir


# ------------------------------------------------------------------------------------ weights_only
class Payload:
    """Pickled as a call to Path.touch(marker): unpickled without weights_only it creates the marker,
    as a crafted checkpoint would run any code it names."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


def crafted_checkpoint(path: Path, marker: Path, checkpoint_format: str = "lam-checkpoint/1") -> Path:
    torch.save({"format": checkpoint_format, "model": {}, "config": {"model": {}, "train": {"run_name": "x"}},
                "step": 1, "payload": Payload(marker)}, path)
    return path


def test_a_crafted_checkpoint_runs_no_code_in_any_reader(pair_shards, latent_dir, tiny_checkpoint, controller_path,
                                                         tmp_path, capsys):
    """Every way a checkpoint is read loads it weights-only: the payload never runs, and each reader
    says the file is not a checkpoint it can read (torch.load(weights_only=False) would run it)."""
    from training.run_folder import peek

    marker = tmp_path / "payload-ran"
    lam = crafted_checkpoint(tmp_path / "best.pt", marker)
    controller = crafted_checkpoint(tmp_path / "controller.pt", marker, "lam-controller/1")
    run = tmp_path / "run"
    run.mkdir()
    crafted_checkpoint(run / "step-000005.pt", marker)
    for read in (lambda: read_checkpoint(lam), lambda: load_checkpoint(lam), lambda: load_controller(controller),
                 lambda: load_model(lam, torch.device("cpu"))):
        with pytest.raises(UserError, match="weights_only=True refuses"):
            read()
    assert peek(run / "step-000005.pt").problem is not None
    out = str(tmp_path / "out")
    assert extract.main(["--shards", str(pair_shards), "--checkpoint", str(lam), "--out", out, "--no-progress"]) == 2
    assert play.main(["rollout", "--checkpoint", str(tiny_checkpoint), "--controller", str(controller),
                      "--latent", str(latent_dir), "--out", out]) == 2
    common = ["--shards", str(pair_shards), "--out", str(run), "--no-compile", "--wandb", "disabled"]
    assert train.main([*common, "--resume"]) == 2                    # reads the latest step file
    assert train.main([*common, "--preset", "tiny"]) == 2             # peeks at it to name the run there
    assert not marker.exists(), "a checkpoint's pickled payload ran"
    capsys.readouterr()
