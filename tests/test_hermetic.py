"""The suite keeps out of the repository's own working folders (tests/conftest.py): each test runs
in a temporary folder, so a command's relative defaults land there, and the session's guard sees
any file added, removed or changed under bulk_videos/, shards/, checkpoints/, runs/, reports/ and
wandb/."""
from __future__ import annotations

import os
from pathlib import Path

from conftest import ROOT, WORKING_FOLDERS, working_folders_digest


def test_every_test_runs_in_a_temporary_folder_outside_the_repository(tmp_path):
    here = Path(os.getcwd()).resolve()
    assert here == tmp_path.resolve() and ROOT not in here.parents


def test_a_commands_default_output_lands_in_the_tests_folder(pair_shards, tiny_checkpoint, tmp_path):
    """extract.py with its default --out (shards/latent, relative): written here, not into ROOT/shards."""
    import extract

    before = working_folders_digest()
    assert extract.main(["--shards", str(pair_shards), "--checkpoint", str(tiny_checkpoint), "--backend", "torch",
                         "--no-progress"]) == 0
    assert (tmp_path / "shards" / "latent" / "manifest.json").is_file()
    assert working_folders_digest() == before


def test_the_guard_sees_a_file_added_changed_or_removed(tmp_path):
    root = tmp_path / "repo"
    (root / "checkpoints" / "latent_action").mkdir(parents=True)
    (root / "checkpoints" / "latent_action" / "best.pt").write_bytes(b"weights")
    (root / "src").mkdir()
    (root / "src" / "code.py").write_text("not a working folder")
    first = working_folders_digest(root)
    assert list(first) == ["checkpoints/latent_action/best.pt"] and "shards" in WORKING_FOLDERS
    (root / "src" / "code.py").write_text("changed, but not a working folder")
    assert working_folders_digest(root) == first
    (root / "checkpoints" / "latent_action" / "best.pt").write_bytes(b"other weights")
    assert working_folders_digest(root) != first
    (root / "checkpoints" / "latent_action" / "best.pt").write_bytes(b"weights")
    (root / "reports").mkdir()
    (root / "reports" / "metrics.json").write_text("{}")
    assert set(working_folders_digest(root)) == {"checkpoints/latent_action/best.pt", "reports/metrics.json"}
