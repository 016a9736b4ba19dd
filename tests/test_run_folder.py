"""train.py's command line keeps runs apart and refuses what would end without a best.pt: a folder
holding a run is refused without --resume; --resume continues only the one run a folder holds, and
only the run asked for; no val split is refused at start; every --set value is checked by its
field's rules (property-tested: any --set text is a config or one clear error)."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings, strategies as st

import train
from common.errors import UserError
from training.cli import argument_parser, config_from_args
from training.config import settable_types


def tiny(shards: Path, out: Path, *extra: str) -> list[str]:
    return ["--shards", str(shards), "--preset", "tiny", "--out", str(out), "--run-dir", str(out.parent / "run"),
            "--iters", "2", "--no-compile", "--wandb", "disabled", *extra]


def one_error_line(capsys) -> str:
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in captured.err, captured.err
    return lines[0]


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(root.iterdir()) if p.is_file()}


@pytest.fixture
def tiny_run(tiny_checkpoint, tmp_path) -> Path:
    """A copy of the session's tiny run folder (step-000010.pt, step-000020.pt, best.pt)."""
    out = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint.parent, out)
    return out


def refuse_work(monkeypatch) -> None:
    monkeypatch.setattr(train, "setup_runtime", lambda *a, **k: pytest.fail("training started"))


# ------------------------------------------------------------------------------------ one run a folder
def test_a_folder_holding_a_run_is_refused_without_resume(pair_shards, tiny_run, capsys, monkeypatch):
    refuse_work(monkeypatch)
    before = tree_bytes(tiny_run)
    run_name = torch.load(tiny_run / "step-000020.pt", weights_only=True)["config"]["train"]["run_name"]
    assert train.main(tiny(pair_shards, tiny_run)) == 2
    line = one_error_line(capsys)
    assert line == (f"error: --out {tiny_run}: holds a run of {run_name} (preset tiny, at step 20); --resume to "
                    f"continue it, or another --out")
    assert tree_bytes(tiny_run) == before                          # its best.pt and step files untouched


def test_a_folder_holding_unreadable_checkpoints_is_refused_too(pair_shards, tmp_path, capsys, monkeypatch):
    refuse_work(monkeypatch)
    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "best.pt").write_bytes(b"not a checkpoint")
    assert train.main(tiny(pair_shards, out)) == 2
    assert "holds a run of checkpoints (best.pt); --resume to continue it, or another --out" in one_error_line(capsys)


def test_resume_refuses_a_folder_of_two_runs(pair_shards, tiny_run, context_checkpoint, capsys, monkeypatch):
    """A step file of another run, newer than this run's: --resume would continue the other run."""
    refuse_work(monkeypatch)
    shutil.copy(context_checkpoint, tiny_run / "step-000030.pt")
    assert train.main(tiny(pair_shards, tiny_run, "--resume", "--iters", "40")) == 2
    line = one_error_line(capsys)
    assert f"--resume: {tiny_run} holds checkpoints of more than one run (step-000030.pt is run " in line
    assert "step-000020.pt (run tiny-" in line and "move one run's files to a folder of its own" in line


@pytest.mark.parametrize("asked", [["--preset", "demo"], ["--set", "run_name=another"]])
def test_resume_refuses_a_command_that_asks_for_another_run(asked, pair_shards, tiny_run, capsys, monkeypatch):
    refuse_work(monkeypatch)
    argv = ["--shards", str(pair_shards), "--out", str(tiny_run), "--iters", "30", "--no-compile", "--wandb",
            "disabled", "--resume", *asked]
    assert train.main(argv) == 2
    line = one_error_line(capsys)
    assert line.startswith(f"error: --resume: {tiny_run} holds run tiny-") and "drop it to continue that run" in line


# ------------------------------------------------------------------------------------ no val split
def test_no_val_split_is_refused_at_start(videos, tmp_path, capsys, monkeypatch):
    from pipeline.pack import pack

    shards = tmp_path / "pairs"
    pack(videos, shards, fractions=(1, 0, 0), pairs_per_shard=64, progress=False)
    refuse_work(monkeypatch)
    assert train.main(tiny(shards, tmp_path / "ckpt")) == 2
    line = one_error_line(capsys)
    assert line.startswith(f"error: {shards}: the val split has no pairs (packed with --fractions 1,0,0)")
    assert not (tmp_path / "ckpt").exists()


# ------------------------------------------------------------------------------------ --set
@pytest.mark.parametrize("setting, problem", [
    ("beta1=nan", "bad configuration: beta1 must be a finite number (got nan)"),
    ("lr=inf", "bad configuration: lr must be a finite number (got inf)"),
    ("action_weight=nan", "bad configuration: action_weight must be a finite number (got nan)"),
])
def test_set_values_are_checked_by_their_fields_rules(setting, problem, pair_shards, tmp_path, capsys, monkeypatch):
    refuse_work(monkeypatch)
    assert train.main(tiny(pair_shards, tmp_path / "ckpt", "--set", setting)) == 2
    assert one_error_line(capsys) == f"error: {problem}"


SETTING = st.one_of(
    st.text(max_size=40),
    st.tuples(st.sampled_from(sorted(settable_types())),
              st.one_of(st.text(max_size=12), st.integers().map(str), st.floats().map(str),
                        st.sampled_from(["true", "no", "1_000", "0x10", "1e309", "-0", " 3 ", "nan", "8,8,4"])))
    .map(lambda pair: f"{pair[0]}={pair[1]}"))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(setting_list=st.lists(SETTING, min_size=1, max_size=3))
@example(setting_list=["grad_accum=0"])          # found by this test in CI: the divisibility check divided by it
def test_any_set_text_is_a_config_or_one_clear_error(setting_list, pair_shards, tmp_path):
    argv = ["--shards", str(pair_shards), "--preset", "tiny", "--out", str(tmp_path / "ckpt")]
    argv += [f"--set={setting}" for setting in setting_list]
    try:
        cfg, resumed = config_from_args(argument_parser().parse_args(argv))
    except UserError as error:
        assert "\n" not in str(error)
    else:
        assert resumed is None and cfg.preset in ("full", "demo", "tiny")


# ------------------------------------------------------------------------------------ --reuse
def test_reuse_keeps_a_finished_run_of_the_same_settings(pair_shards, tiny_checkpoint, tiny_run, capsys,
                                                         monkeypatch):
    """`make demo` run again: the finished run is kept, nothing is trained, nothing is rewritten."""
    refuse_work(monkeypatch)
    before = tree_bytes(tiny_run)
    assert train.main([*tiny(pair_shards, tiny_run, "--reuse"), "--iters", "20", "--set", "ckpt_every=10"]) == 0
    assert "finished at step 20 (--iters 20): nothing to train" in capsys.readouterr().out
    assert tree_bytes(tiny_run) == before


def test_reuse_continues_a_run_of_the_same_settings_that_stopped_early(pair_shards, tiny_run, capsys):
    for name in ("best.pt", "step-000020.pt"):          # as if the run had been stopped after step 10
        (tiny_run / name).unlink()
    assert train.main([*tiny(pair_shards, tiny_run, "--reuse"), "--iters", "20", "--set", "ckpt_every=10"]) == 0
    assert "resuming" in capsys.readouterr().out
    assert torch.load(tiny_run / "step-000020.pt", weights_only=True)["step"] == 20


def test_reuse_sets_a_run_of_other_settings_aside_and_trains_afresh(pair_shards, tiny_run, capsys):
    before = tree_bytes(tiny_run)
    assert train.main([*tiny(pair_shards, tiny_run, "--reuse"), "--set", "lr=0.002"]) == 0
    printed = capsys.readouterr().out
    aside = [path for path in tiny_run.parent.iterdir() if path.name.startswith("ckpt.previous-")]
    assert len(aside) == 1 and f"moved it to {aside[0]}" in printed
    assert tree_bytes(aside[0]) == before                          # nothing good is lost
    assert sorted(p.name for p in tiny_run.iterdir()) == ["best.pt", "step-000002.pt"]
