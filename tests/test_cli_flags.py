"""Numbers on every command line are checked where they are parsed, by the rules their config
dataclass states (common/cli.py): a bad value is one `error:` line naming the flag, exit 2, before
any work; the same rules check a config built another way (`check_fields`)."""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import pytest

from common.cli import add_config_flags, check_fields, config_values, flag
from common.errors import UserError, run_cli
import play
import pipeline.pack as pack
import pipeline.record as record
from control import train as control_train


@dataclass
class Example:
    steps: int = flag(3, min=1)
    lr: float = flag(0.1, above=0)
    share: float = flag(0.5, min=0, max=1)
    beta: float = flag(0.9, min=0, below=1)
    widths: tuple[int, ...] = flag((2, 2), min=1)
    mode: str = flag("a", choices=("a", "b"))
    free: float = 1.0                        # no rules: still finite
    wild: float = flag(1.0, finite=False)


def parse(argv: list[str]) -> Example:
    parser = argparse.ArgumentParser()
    add_config_flags(parser, Example)
    return Example(**config_values(parser.parse_args(argv), Example))


@pytest.mark.parametrize("argv, message", [
    (["--steps", "0"], "--steps must be >= 1 (got 0)"),
    (["--steps", "1.5"], "--steps: expected an integer, got '1.5'"),
    (["--lr", "0"], "--lr must be > 0 (got 0.0)"),
    (["--lr", "nan"], "--lr must be a finite number (got nan)"),
    (["--lr=-inf"], "--lr must be a finite number (got -inf)"),
    (["--share", "1.5"], "--share must be <= 1 (got 1.5)"),
    (["--beta", "1"], "--beta must be < 1 (got 1.0)"),
    (["--widths", "3", "0"], "--widths must be >= 1 (got 0)"),
    (["--mode", "c"], "--mode must be one of a, b (got 'c')"),
    (["--free", "inf"], "--free must be a finite number (got inf)"),
])
def test_a_bad_value_is_one_user_error_naming_the_flag(argv, message):
    with pytest.raises(UserError) as raised:
        parse(argv)
    assert str(raised.value) == message


def test_good_values_and_defaults_pass():
    assert parse([]) == Example()
    config = parse(["--steps", "1", "--lr", "1e-9", "--share", "1", "--widths", "1", "5", "--mode", "b",
                    "--wild", "inf"])
    assert (config.steps, config.share, config.widths, config.mode, config.wild) == (1, 1.0, [1, 5], "b", float("inf"))


def test_check_fields_applies_the_same_rules_to_an_instance():
    check_fields(Example())
    with pytest.raises(UserError, match=r"^--steps must be >= 1 \(got -2\)$"):
        check_fields(Example(steps=-2))
    with pytest.raises(UserError, match=r"^bad configuration: free must be a finite number \(got nan\)$"):
        check_fields(Example(free=float("nan")), label=lambda name: name, prefix="bad configuration: ")


# ------------------------------------------------------------------------------------ the commands
def one_error_line(capsys) -> str:
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in captured.err, captured.err
    return lines[0]


@pytest.mark.parametrize("command, argv, flag_message", [
    ("control.train", ["--lr", "nan"], "--lr must be a finite number"),
    ("control.train", ["--lr", "0"], "--lr must be > 0"),
    ("control.train", ["--hidden", "0"], "--hidden must be >= 1"),
    ("control.train", ["--channels", "0", "0", "0", "0", "0"], "--channels must be >= 1"),
    ("control.train", ["--threads", "-1"], "--threads must be >= 0"),
    ("control.train", ["--device", "bogus"], "--device must be one of auto, cpu, cuda"),
    ("control.train", ["--weight-decay", "-1"], "--weight-decay must be >= 0"),
    ("control.train", ["--max-grids", "-1"], "--max-grids must be >= 0"),
    ("play bench", ["--steps", "0"], "--steps must be >= 1"),
    ("play rollout", ["--gifs", "-1"], "--gifs must be >= 0"),
    ("play rollout", ["--threads", "-2"], "--threads must be >= 0"),
    ("play serve", ["--max-episodes", "0"], "--max-episodes must be >= 1"),
    ("pack", ["--seed", "-1"], "--seed must be >= 0"),
    ("pack", ["--workers", "0"], "--workers must be >= 1"),
    ("record", ["--sticky", "nan"], "--sticky must be a finite number"),
    ("record", ["--sticky", "1.5"], "--sticky must be <= 1"),
    ("record", ["--episodes", "0"], "--episodes must be >= 1"),
    ("record", ["--seed", "-1"], "--seed must be >= 0"),
])
def test_every_command_checks_its_numbers_before_any_work(command, argv, flag_message, tmp_path, monkeypatch,
                                                         capsys):
    def started(*args, **kwargs):
        raise AssertionError(f"{command} started work with {argv}")

    for module, name in ((control_train, "train"), (play, "load_simulator"), (pack, "list_episodes"),
                         (record, "record_episode")):
        monkeypatch.setattr(module, name, started)
    out = str(tmp_path / "out")
    runs = {"control.train": lambda: control_train.main(["--latent", str(tmp_path), "--out", out, *argv]),
            "play bench": lambda: play.main(["bench", "--out", out, *argv]),
            "play rollout": lambda: play.main(["rollout", "--out", out, *argv]),
            "play serve": lambda: play.main(["serve", *argv]),
            "pack": lambda: pack.main(["--src", str(tmp_path), "--out", out, *argv]),
            "record": lambda: record.main(["--out", out, "--episodes", "1", "--max-steps", "2", *argv])}
    assert runs[command]() == 2
    assert flag_message in one_error_line(capsys)
    assert not Path(out).exists()


def test_configs_built_in_python_are_checked_too(tmp_path):
    with pytest.raises(UserError, match="--hidden must be >= 1"):
        control_train.ControllerTrainConfig(latent=tmp_path, out=tmp_path / "out", hidden=0)
    with pytest.raises(UserError, match="--steps must be >= 1"):
        play.BenchConfig(steps=0, out=tmp_path)


def test_a_device_torch_does_not_know_is_one_line():
    from common.device import resolve_device

    for device in ("bogus", "cuda:x", "tpu"):
        with pytest.raises(UserError, match="is not a device|is not supported"):
            resolve_device(device)


def test_a_closed_stdout_ends_the_command_quietly(videos, tmp_path):
    """`python -m pipeline.pack ... | head -1`: the reader goes away before the summary is written
    (here `true`, which reads nothing); the command stops without a BrokenPipeError traceback."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    pipeline = subprocess.run(f"{sys.executable} -m pipeline.pack --src {videos} --out {tmp_path / 'out'} "
                              f"--no-progress | true; exit ${{PIPESTATUS[0]}}", shell=True,
                              executable="/bin/bash", cwd=root, capture_output=True, text=True)
    assert "Traceback" not in pipeline.stderr and "BrokenPipeError" not in pipeline.stderr, pipeline.stderr
    assert pipeline.returncode in (0, 141)
    assert (tmp_path / "out" / "manifest.json").is_file()        # the work itself was done


def test_run_cli_turns_a_broken_pipe_into_exit_141(capsys):
    def writes_to_a_closed_pipe(argv):
        raise BrokenPipeError(32, "Broken pipe")

    assert run_cli(writes_to_a_closed_pipe, []) == 141
    assert capsys.readouterr().err == ""


# ------------------------------------------------------------------------------------ upper bounds
@pytest.mark.parametrize("command, argv, message", [
    ("extract", ["--batch-size", "99999999999"], "--batch-size must be <= 4096 (got 99999999999)"),
    ("extract", ["--loader-threads", "100000"], "--loader-threads must be <= 256 (got 100000)"),
    ("extract", ["--threads", "100000"], "--threads must be <= 256 (got 100000)"),
    ("evaluate", ["--threads", "100000"], "--threads must be <= 256 (got 100000)"),
    ("evaluate", ["--seed", "4294967296"], "--seed must be <= 2147483647"),
    ("control.train", ["--threads", "100000"], "--threads must be <= 256"),
    ("control.train", ["--shuffle-buffer", "1000000000"], "--shuffle-buffer must be <= 65536"),
    ("play rollout", ["--horizon", "1000000"], "--horizon must be <= 10000"),
    ("pack", ["--workers", "100000"], "--workers must be <= 256"),
    ("train", ["--set", "code_dim=100000000"], "code_dim must be in [1, 4096], got 100000000"),
    ("train", ["--set", "threads=100000"], "threads must be <= 256"),
    ("train", ["--set", "seed=4294967296"], "seed must be <= 2147483647"),
    ("train", ["--model", "split", "--set", "action_code.levels=300,300"],
     "action_code.levels 300,300 make 90000 codes; 2 to 65536 fit"),
    ("train", ["--set", "shift.max_x=100000"], "shift.max_x and shift.max_y must be in [0, 80]"),
])
def test_a_number_past_what_can_work_is_refused_naming_the_bound(command, argv, message, tmp_path, capsys):
    """Memory, threads and the stored code type have limits: a value past one is one line that
    says the bound, before any work (these were an allocation traceback, DALI's TypeError, rc 134
    and 139, and a model whose codes no uint16 holds)."""
    import evaluate
    import extract
    import train

    out = str(tmp_path / "out")
    runs = {"extract": lambda: extract.main(["--shards", str(tmp_path), "--checkpoint", str(tmp_path / "x.pt"),
                                             "--out", out, *argv]),
            "evaluate": lambda: evaluate.main(["--shards", str(tmp_path), "--checkpoint", str(tmp_path / "x.pt"),
                                               "--out", out, *argv]),
            "control.train": lambda: control_train.main(["--latent", str(tmp_path), "--out", out, *argv]),
            "play rollout": lambda: play.main(["rollout", "--out", out, *argv]),
            "pack": lambda: pack.main(["--src", str(tmp_path), "--out", out, *argv]),
            "train": lambda: train.main(["--shards", str(tmp_path), "--preset", "tiny", "--out", out,
                                         "--run-dir", str(tmp_path / "run"), *argv])}
    assert runs[command]() == 2
    assert message in one_error_line(capsys)
    assert not Path(out).exists()
