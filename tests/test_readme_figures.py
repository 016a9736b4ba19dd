"""Reports record where their figures came from (common/provenance.py), and `make readme-figures`
(bench/readme_figures.py) writes the README's headline table, GIF and pipeline picture from them.
Run on the suite's own tiny reports, into a temporary copy of the README: never the repository's
README, reports/ or docs/img/."""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import shutil
from pathlib import Path

import pytest
import torch

import evaluate
import play
from bench import readme_figures
from bench.readme_figures import README_BEGIN, README_END
from common.provenance import cpu_state, describe, git_state
from control import Controller, ControllerConfig, save_controller
from evaluation.formatting import num, pct

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def demo_reports(pair_shards, tiny_checkpoint, latent_dir, tmp_path_factory) -> Path:
    """`reports/` as `make demo` leaves it, at test scale: test/ (evaluate.py) and play/ (play.py
    rollout, with an untrained controller: the table needs its shapes, not its skill)."""
    root = tmp_path_factory.mktemp("demo") / "reports"
    torch.manual_seed(0)
    controller = save_controller(root.parent / "controller.pt", Controller(ControllerConfig(
        channels=(4, 8, 8, 8, 8), hidden=16, action_dim=8)).eval(), step=0)
    with contextlib.redirect_stdout(io.StringIO()):
        assert evaluate.main(["--shards", str(pair_shards), "--checkpoint", str(tiny_checkpoint), "--split", "test",
                              "--out", str(root / "test"), "--batch-size", "32", "--backend", "torch",
                              "--no-progress", "--latent", str(latent_dir), "--probe-limit", "40"]) == 0
        assert play.main(["rollout", "--checkpoint", str(tiny_checkpoint), "--controller", str(controller),
                          "--latent", str(latent_dir), "--out", str(root / "play"), "--horizon", "6", "--starts", "4",
                          "--gifs", "2", "--control-starts", "6", "--control-steps", "3", "--batch-size", "4"]) == 0
    return root


def report(root: Path, name: str) -> dict:
    return json.loads((root / name / "metrics.json").read_text())


def readme_copy(tmp_path: Path) -> Path:
    copy = tmp_path / "README.md"
    shutil.copyfile(ROOT / "README.md", copy)
    return copy


def block_of(text: str) -> str:
    return text[text.index(README_BEGIN) + len(README_BEGIN):text.index(README_END)]


def outside_block(text: str) -> tuple[str, str]:
    return text[:text.index(README_BEGIN)], text[text.index(README_END):]


def run(*argv: str) -> int:
    return readme_figures.main([str(arg) for arg in argv])


# ------------------------------------------------------------------------------------ provenance
def test_reports_record_the_commit_the_machine_and_the_model(demo_reports, tiny_checkpoint):
    test, rollout = report(demo_reports, "test"), report(demo_reports, "play")
    for where in (test["provenance"], rollout["provenance"]):
        assert where["commit"] == git_state()["commit"] and isinstance(where["dirty"], bool)
        assert where["cpu"]["model"] and where["cpu"]["cores"] >= 1 and where["cpu"]["simd"]
        assert where["torch"] == torch.__version__ and where["python"]
        assert "gpu" in where and (where["gpu"] is None) == (not torch.cuda.is_available())
        assert (where["variant"], where["preset"]) == ("default", "tiny") and where["trained_at"]
        assert where["precision"] in ("fp32", "bf16")
    assert rollout["provenance"]["checkpoint_sha256"] == test["checkpoint"]["sha256"]


@pytest.mark.parametrize("flags, words", [
    ("fpu sse2 avx avx2 fma", "AVX2 only, no avx512_bf16 or AMX"),
    ("avx2 avx512f avx512bw", "AVX-512, no avx512_bf16 or AMX"),
    ("avx2 avx512f avx512_bf16 amx_tile amx_bf16", "native bf16: amx_bf16, avx512_bf16"),
    ("fpu sse2", "no AVX2"),
])
def test_the_cpu_flags_that_decide_precision_are_said_in_words(flags, words):
    cpu = cpu_state(f"processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: {flags}\n\nprocessor\t: 1\n")
    assert cpu["model"] == "Some CPU" and cpu["simd"] == words
    assert set(cpu["flags"]) <= {"avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16"}
    assert cpu_state("")["simd"] == "CPU flags unknown"


def test_a_record_is_one_line_naming_commit_and_machine():
    line = describe({"commit": "0123456789abcdef", "dirty": True, "gpu": None, "torch": "2.13.0",
                     "cpu": {"model": "AMD EPYC", "cores": 2, "simd": "AVX2 only, no avx512_bf16 or AMX"}})
    assert line == ("commit 0123456 with uncommitted changes; AMD EPYC, 2 cores, AVX2 only, no avx512_bf16 or AMX; "
                    "no GPU; torch 2.13.0")
    assert "not recorded" in describe(None)


# ------------------------------------------------------------------------------------ make readme-figures
def test_the_table_is_written_from_the_reports_into_a_copy_of_the_readme(demo_reports, tmp_path):
    repository_readme = hashlib.sha256((ROOT / "README.md").read_bytes()).hexdigest()
    repository_img = sorted(p.name for p in (ROOT / "docs" / "img").iterdir())
    readme, img = readme_copy(tmp_path), tmp_path / "img"
    before = readme.read_text()
    assert run("--reports", demo_reports, "--readme", readme, "--img", img) == 0

    after = readme.read_text()
    assert outside_block(after) == outside_block(before)           # the rest of the page untouched
    assert len(after.splitlines()) <= 200
    table = block_of(after)
    test, rollout = report(demo_reports, "test"), report(demo_reports, "play")
    assert f"| {num(test['model']['psnr'])} / {num(test['model']['psnr_changed'])} |" in table
    assert f"copy frame t: {num(test['copy_baseline']['psnr'])}" in table
    assert "played forward 6 steps on the recorded codes" in table and "held LEFT / RIGHT for 3 steps" in table
    codes = rollout["rollouts"]["curves"]["codes"]                 # a frozen ball is found: its moving share beside
    assert f"{pct(codes['ball_found'][-1], 0)} ({pct(codes['ball_moving'][-1], 0)})" in table
    assert f"{test['pairs']} pairs" in table and test["checkpoint"]["sha256"][:12] in table
    assert describe(test["provenance"]) in table and "preset tiny, variant default" in table
    assert (img / "rollout.gif").read_bytes() == (demo_reports / "play" / rollout["gifs"][0]).read_bytes()
    assert (img / "pipeline.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    assert run("--reports", demo_reports, "--readme", readme, "--img", img, "--no-pipeline") == 0
    assert readme.read_text() == after                              # the same reports, the same page
    assert run("--reports", demo_reports, "--readme", readme, "--img", img, "--gif", rollout["gifs"][1]) == 0
    assert (img / "rollout.gif").read_bytes() == (demo_reports / "play" / rollout["gifs"][1]).read_bytes()

    assert hashlib.sha256((ROOT / "README.md").read_bytes()).hexdigest() == repository_readme
    assert sorted(p.name for p in (ROOT / "docs" / "img").iterdir()) == repository_img


def test_without_a_rollout_report_the_table_has_the_one_step_rows(demo_reports, tmp_path):
    reports = tmp_path / "reports"
    shutil.copytree(demo_reports / "test", reports / "test")
    readme = readme_copy(tmp_path)
    assert run("--reports", reports, "--readme", readme, "--img", tmp_path / "img", "--no-pipeline") == 0
    table = block_of(readme.read_text())
    assert "one step: PSNR" in table and "played forward" not in table
    assert not (tmp_path / "img" / "rollout.gif").exists()


def test_reports_from_before_provenance_are_named_as_such(demo_reports, tmp_path):
    reports = tmp_path / "reports"
    shutil.copytree(demo_reports, reports)
    for name in ("test", "play"):
        path = reports / name / "metrics.json"
        metrics = json.loads(path.read_text())
        del metrics["provenance"]
        path.write_text(json.dumps(metrics))
    readme = readme_copy(tmp_path)
    assert run("--reports", reports, "--readme", readme, "--img", tmp_path / "img", "--no-pipeline") == 0
    assert "source not recorded" in block_of(readme.read_text())


def test_what_it_refuses_is_one_line_and_leaves_the_readme_alone(demo_reports, tmp_path, capsys):
    readme, img = readme_copy(tmp_path), tmp_path / "img"
    original = readme.read_text()

    def refused(*argv, says: str) -> None:
        assert run(*argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err and says in err, err
        assert readme.read_text() == original

    refused("--reports", tmp_path / "nothing", "--readme", readme, "--img", img, says="make eval writes it")
    refused("--reports", demo_reports, "--readme", readme, "--img", img, "--gif", "../metrics.json",
            says="no such GIF")
    plain = tmp_path / "plain.md"
    plain.write_text("# a page without the marker lines\n")
    refused("--reports", demo_reports, "--readme", plain, "--img", img, says="needs one line")
    assert plain.read_text() == "# a page without the marker lines\n"

    other = tmp_path / "other"
    shutil.copytree(demo_reports, other)
    metrics = json.loads((other / "play" / "metrics.json").read_text())
    metrics["provenance"]["checkpoint_sha256"] = "0" * 64
    (other / "play" / "metrics.json").write_text(json.dumps(metrics))
    refused("--reports", other, "--readme", readme, "--img", img, says="on one checkpoint")
