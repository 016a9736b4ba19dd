"""Shared test data, made by the tests themselves: a few short real ALE Breakout episodes, packed
into pair shards, and a `tiny` model trained on them. Session-scoped, so each is built once.

The suite is hermetic: every test runs in a temporary working folder of its own (so a command's
default `--out checkpoints/...`, `reports/...` or `wandb/` lands there, never in the repository),
subprocesses find the project through PYTHONPATH, and the session fails if anything in the
repository's own working folders (WORKING_FOLDERS) was added, removed or changed while it ran:
`make demo` then `make test` must leave a demo's outputs byte for byte as they were."""
from __future__ import annotations

import hashlib
import os
import shutil
import sys
from pathlib import Path
from typing import Callable

import pytest
from filelock import FileLock

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
# subprocesses started from a temporary folder import the project from here
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))

WORKING_FOLDERS = ("bulk_videos", "shards", "checkpoints", "runs", "reports", "wandb")


def working_folders_digest(root: Path = ROOT) -> dict[str, str]:
    """relative path -> sha256 of every file under the repository's working folders."""
    found = {}
    for name in WORKING_FOLDERS:
        for path in sorted((root / name).rglob("*")) if (root / name).is_dir() else []:
            if path.is_file() and not path.is_symlink():
                digest = hashlib.sha256()
                with open(path, "rb") as file:
                    for block in iter(lambda: file.read(1 << 20), b""):
                        digest.update(block)
                found[str(path.relative_to(root))] = digest.hexdigest()
    return found


def pytest_sessionstart(session):
    if not hasattr(session.config, "workerinput"):      # the controller checks; xdist workers need no digest
        session.config._working_folders = working_folders_digest()


def pytest_sessionfinish(session, exitstatus):
    before = getattr(session.config, "_working_folders", None)
    if before is None:
        return
    after = working_folders_digest()
    changed = sorted(set(before) ^ set(after) | {name for name in set(before) & set(after) if before[name] != after[name]})
    if changed:
        shown = ", ".join(changed[:10]) + (f" and {len(changed) - 10} more" if len(changed) > 10 else "")
        session.config.get_terminal_writer().line(
            f"error: the tests changed the repository's working folders ({', '.join(WORKING_FOLDERS)}): {shown}",
            red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


# The slowest test files, slowest first (seconds summed over their tests, `make test` on a 2-core CPU
# with an empty inductor cache, as in CI: 83, 59, 55, 50, 27, 27, 26, 23, 22, 18, 18). `make test`
# gives each core a worker and each worker whole files (`--dist loadfile --no-loadscope-reorder`):
# starting the long files first lets the short ones fill in at the end, instead of one core
# finishing a long file alone.
SLOWEST_FIRST = ("test_scale_out.py", "test_train.py", "test_crash.py", "test_compile.py", "test_evaluate.py",
                 "test_training_faults.py", "test_lock.py", "test_extract.py", "test_play.py", "test_loader.py",
                 "test_gpu_check.py")


def pytest_collection_modifyitems(session, config, items):
    rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))      # stable: the rest keep their order


@pytest.fixture(autouse=True)
def _in_a_folder_of_its_own(tmp_path, monkeypatch):
    """Each test's working folder is its own temporary folder: relative defaults never reach ROOT."""
    monkeypatch.chdir(tmp_path)

TEST_EPISODES = 6
TEST_MAX_STEPS = 48
TEST_PAIRS_PER_SHARD = 16


def built_once(tmp_path_factory, name: str, build: Callable[[Path], None]) -> Path:
    """A folder of session data that `build(folder)` fills, made once per `make test`. Under xdist
    the first worker that asks builds it where every worker finds it (pytest-xdist's recipe: the
    base temp folder's parent, behind a file lock) and the others wait and read it: each worker
    recording, packing, training and extracting its own copy cost the suite's two cores the same
    work twice. Tests read these folders; one that changes what it was given copies it first."""
    if os.environ.get("PYTEST_XDIST_WORKER") is None:
        folder = tmp_path_factory.mktemp(name)
        build(folder)
        return folder
    folder = tmp_path_factory.getbasetemp().parent / "built" / name
    done = folder.with_suffix(".done")
    folder.parent.mkdir(exist_ok=True)
    with FileLock(str(folder.with_suffix(".lock"))):
        if not done.exists():
            shutil.rmtree(folder, ignore_errors=True)        # what a worker that failed mid-build left
            folder.mkdir()
            build(folder)
            done.touch()
    return folder


@pytest.fixture(scope="session")
def videos(tmp_path_factory) -> Path:
    """`bulk_videos/` with TEST_EPISODES real Breakout episodes (PNG frames + meta.jsonl)."""
    from pipeline.record import record

    def build(folder: Path) -> None:
        record(folder / "bulk_videos", episodes=TEST_EPISODES, max_steps=TEST_MAX_STEPS, seed=0, workers=1,
               progress=False)

    return built_once(tmp_path_factory, "recorded", build) / "bulk_videos"


@pytest.fixture(scope="session")
def pair_shards(videos, tmp_path_factory) -> Path:
    """`shards/pairs/` packed from `videos` (several shards per split, with .idx and manifest.json)."""
    from pipeline.pack import pack

    def build(folder: Path) -> None:
        pack(videos, folder / "pairs", seed=0, pairs_per_shard=TEST_PAIRS_PER_SHARD, workers=1, progress=False)

    return built_once(tmp_path_factory, "shards", build) / "pairs"


@pytest.fixture(scope="session")
def broken_shards(videos, tmp_path_factory) -> Path:
    """Pair shards packed (lenient) from `bad_frames.make_broken_videos`: episodes with rejected,
    missing and converted frames, so some pairs have no frame t-1 in the middle of an episode."""
    from bad_frames import make_broken_videos
    from pipeline.pack import pack

    def build(folder: Path) -> None:
        pack(make_broken_videos(videos, folder / "bulk_videos"), folder / "pairs", seed=0,
             pairs_per_shard=TEST_PAIRS_PER_SHARD, workers=1, progress=False)

    return built_once(tmp_path_factory, "broken", build) / "pairs"


def trained(tmp_path_factory, name: str, pair_shards: Path, iters: int, *settings: str) -> Path:
    """A `tiny` model trained `iters` steps on `pair_shards` (eager, no wandb); its last checkpoint."""
    import train

    def build(folder: Path) -> None:
        code = train.main(["--shards", str(pair_shards), "--preset", "tiny", "--out", str(folder / "ckpt"),
                           "--run-dir", str(folder / "run"), "--iters", str(iters), "--no-compile",
                           "--wandb", "disabled", "--set", "ckpt_every=10", *settings])
        assert code == 0

    return built_once(tmp_path_factory, name, build) / "ckpt" / f"step-{iters:06d}.pt"


def extracted(tmp_path_factory, name: str, pair_shards: Path, checkpoint: Path) -> Path:
    """`shards/latent` (with .tar.zst copies) of `pair_shards` through `checkpoint`, in fp32 whatever
    the CPU: tests compare the codes with the fp32 model's (bf16 has its own tests)."""
    import extract

    def build(folder: Path) -> None:
        code = extract.main(["--shards", str(pair_shards), "--checkpoint", str(checkpoint), "--out",
                             str(folder / "latent"), "--batch-size", "24", "--backend", "torch", "--no-progress",
                             "--zstd", "--amp", "off"])
        assert code == 0

    return built_once(tmp_path_factory, name, build) / "latent"


@pytest.fixture(scope="session")
def tiny_checkpoint(pair_shards, tmp_path_factory) -> Path:
    """A `tiny` model trained 20 steps on `pair_shards`; returns the path of step-000020.pt."""
    return trained(tmp_path_factory, "tiny_run", pair_shards, 20)


@pytest.fixture(scope="session")
def latent_dir(pair_shards, tiny_checkpoint, tmp_path_factory) -> Path:
    """`shards/latent` (with .tar.zst copies) of `pair_shards` through `tiny_checkpoint`. Shared by the
    extraction, stream and evaluation tests; a test that changes it copies it first."""
    return extracted(tmp_path_factory, "latent", pair_shards, tiny_checkpoint)


@pytest.fixture(scope="session")
def context_checkpoint(pair_shards, tmp_path_factory) -> Path:
    """A `tiny` model with frame t-1 as context (`--set context=1`) trained 10 steps on `pair_shards`;
    returns the path of step-000010.pt."""
    return trained(tmp_path_factory, "context_run", pair_shards, 10, "--set", "context=1")


@pytest.fixture(scope="session")
def context_latent_dir(pair_shards, context_checkpoint, tmp_path_factory) -> Path:
    """`shards/latent` (with .tar.zst copies) of `pair_shards` through `context_checkpoint`: samples
    with `<key>.prev.png`."""
    return extracted(tmp_path_factory, "context_latent", pair_shards, context_checkpoint)
