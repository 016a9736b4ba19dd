"""What readers check of what a manifest promises: the manifest itself against its schema (one line
naming the file and the field, shard paths inside the folder), every shard's sample count and
length (always) and sha256 (on request; on by default where extraction and evaluation read)."""
from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import evaluate
import extract
import play
import train
from common.errors import UserError
from control import Controller, ControllerConfig, save_controller
from control import train as control_train
from pipeline.loader import build_loader, in_order_loader
from pipeline.shards import LATENT_FORMAT, PAIRS_FORMAT, load_manifest, read_index, split_shards
from pipeline.stream import latent_dataset, latent_urls


@pytest.fixture
def shard_copy(pair_shards, tmp_path) -> Path:
    out = tmp_path / "pairs"
    shutil.copytree(pair_shards, out)
    return out


def edit_manifest(folder: Path, change) -> None:
    manifest = json.loads((folder / "manifest.json").read_text())
    change(manifest)
    (folder / "manifest.json").write_text(json.dumps(manifest))


def message(call) -> str:
    with pytest.raises(UserError) as raised:
        call()
    text = str(raised.value)
    assert "\n" not in text
    return text


# ------------------------------------------------------------------------------------ the schema
@pytest.mark.parametrize("change, field, problem", [
    (lambda m: m["splits"]["train"].pop("shards"), "splits.train.shards", "missing"),
    (lambda m: m["splits"].update(train=[]), "splits.train", "must be an object"),
    (lambda m: m["splits"]["val"]["shards"][0].update(pairs="16"), "splits.val.shards[0].pairs", "must be an integer"),
    (lambda m: m["splits"]["val"]["shards"][0].update(pairs=-1), "splits.val.shards[0].pairs", "must be >= 0"),
    (lambda m: m["splits"]["test"]["shards"][0].update(sha256="abc"), "splits.test.shards[0].sha256", "sha256"),
    (lambda m: m["splits"]["train"].update(pairs=1), "splits.train.pairs", "but its shards hold"),
    (lambda m: m["splits"].update(dev={"shards": []}), "splits.dev", "unknown"),
    (lambda m: m.update(frame={"height": 0, "width": 160}), "frame.height", "must be >= 1"),
    (lambda m: m["splits"]["train"]["shards"][1].update(file="../../../../etc/passwd"), "splits.train.shards[1].file",
     "inside the shard folder"),
    (lambda m: m["splits"]["train"]["shards"][0].update(index="/etc/passwd"), "splits.train.shards[0].index",
     "inside the shard folder"),
    (lambda m: m["splits"]["train"]["shards"][0].update(file="train/../../x.tar"), "splits.train.shards[0].file",
     "inside the shard folder"),
    # the palette every generated frame is snapped to: one colour drew every frame black, a NaN and a
    # list where the object belongs were tracebacks, 3,000 colours took 2.6 GB to snap one frame
    (lambda m: m.update(palette={"rgb": [[0, 0, 0]]}), "palette.rgb", "must hold 2 to 64 colours, got 1"),
    (lambda m: m.update(palette={"rgb": [[0, 0, 0]] * 3000}), "palette.rgb", "must hold 2 to 64 colours, got 3000"),
    (lambda m: m.update(palette={"rgb": [[0, 0, 0], [float("nan"), 0, 0]]}), "palette.rgb[1][0]",
     "must be an integer"),
    (lambda m: m.update(palette={"rgb": [[0, 0, 0], [256, 0, 0]]}), "palette.rgb[1][0]", "must be <= 255"),
    (lambda m: m.update(palette={"rgb": [[0, 0, 0], [1, 2]]}), "palette.rgb[1]", "must be a colour [r, g, b]"),
    (lambda m: m.update(palette=[[0, 0, 0], [9, 9, 9]]), "palette", "must be an object"),
])
def test_a_manifest_field_out_of_schema_is_one_line_naming_it(shard_copy, change, field, problem):
    edit_manifest(shard_copy, change)
    text = message(lambda: load_manifest(shard_copy, PAIRS_FORMAT))
    assert text.startswith(f"{shard_copy / 'manifest.json'}: {field}: ") and problem in text, text


def test_a_shard_path_outside_the_folder_is_never_opened(shard_copy, monkeypatch):
    edit_manifest(shard_copy, lambda m: m["splits"]["train"]["shards"][0].update(file="../../../../etc/passwd"))
    opened = []
    real_open = Path.open
    monkeypatch.setattr(Path, "open", lambda self, *a, **k: opened.append(str(self)) or real_open(self, *a, **k))
    with pytest.raises(UserError, match="inside the shard folder"):
        build_loader(shard_copy, "train", 4, backend="torch", device="cpu")
    with pytest.raises(UserError, match="inside the shard folder"):      # a manifest dict made elsewhere
        split_shards(shard_copy, json.loads((shard_copy / "manifest.json").read_text()), "train")
    assert not [path for path in opened if "passwd" in path]


@pytest.mark.parametrize("content, problem", [
    (random.Random(0).randbytes(2000), "not UTF-8"), (b"", "not JSON"), (b"{\"format\": ", "not JSON"),
    (b"[1, 2]", "not a manifest (JSON a list"), (b"[" * 100_000, "not JSON"),
    (json.dumps({"format": PAIRS_FORMAT}).encode(), "splits: missing"),
])
def test_junk_manifests_are_one_line(shard_copy, content, problem):
    (shard_copy / "manifest.json").write_bytes(content)
    text = message(lambda: load_manifest(shard_copy, PAIRS_FORMAT))
    assert text.startswith(str(shard_copy / "manifest.json")) and problem in text, text


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                    max_leaves=20)
SHARD_ENTRY = st.fixed_dictionaries({}, optional={"file": JSON | st.text(max_size=30), "index": JSON,
                                                  "pairs": JSON | st.integers(-2, 40), "sha256": JSON,
                                                  "zstd": JSON})
MANIFEST = st.fixed_dictionaries({"format": st.sampled_from([PAIRS_FORMAT, LATENT_FORMAT]) | JSON},
                                 optional={"splits": st.dictionaries(st.sampled_from(["train", "val", "test", "x"]),
                                                                     st.fixed_dictionaries(
                                                                         {}, optional={"shards": st.lists(SHARD_ENTRY,
                                                                                                          max_size=3)
                                                                                       | JSON, "pairs": JSON,
                                                                                       "episodes": JSON}) | JSON,
                                                                     max_size=3) | JSON,
                                           "frame": JSON, "checkpoint": JSON})


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(manifest=MANIFEST | JSON, expected=st.sampled_from([PAIRS_FORMAT, LATENT_FORMAT]))
def test_any_manifest_loads_or_is_one_clear_error(tmp_path, manifest, expected):
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    try:
        loaded = load_manifest(tmp_path, expected)
    except UserError as error:
        assert str(error).startswith(f"{tmp_path / 'manifest.json'}: ") and "\n" not in str(error)
        return
    for split in loaded["splits"]:                  # a manifest that loads is safe to walk
        try:
            split_shards(tmp_path, loaded, split)
        except UserError as error:
            assert "missing" in str(error) and str(tmp_path) in str(error)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(content=st.binary(max_size=300))
def test_any_bytes_as_a_manifest_are_one_clear_error(tmp_path, content):
    (tmp_path / "manifest.json").write_bytes(content)
    with pytest.raises(UserError, match="manifest.json: "):
        load_manifest(tmp_path, PAIRS_FORMAT)


# ------------------------------------------------------------------------------------ every reader
@pytest.fixture(scope="module")
def small_controller(tmp_path_factory) -> Path:
    controller = Controller(ControllerConfig(channels=(4, 8, 8, 8, 8), hidden=16, action_dim=8)).eval()
    return save_controller(tmp_path_factory.mktemp("controller") / "controller.pt", controller, step=0)


@pytest.mark.parametrize("junk", ["random bytes", "no shards"])
def test_every_command_given_a_junk_manifest_says_so_in_one_line(junk, pair_shards, latent_dir, tiny_checkpoint,
                                                                 small_controller, tmp_path, capsys):
    pairs, latent = tmp_path / "pairs", tmp_path / "latent"
    shutil.copytree(pair_shards, pairs)
    shutil.copytree(latent_dir, latent)
    for folder in (pairs, latent):
        if junk == "random bytes":
            (folder / "manifest.json").write_bytes(random.Random(1).randbytes(3000))
        else:
            edit_manifest(folder, lambda m: m["splits"]["train"].pop("shards"))
    out = str(tmp_path / "out")
    runs = {
        "train": (pairs, lambda: train.main(["--shards", str(pairs), "--preset", "tiny", "--out", out, "--run-dir",
                                             str(tmp_path / "run"), "--no-compile", "--wandb", "disabled"])),
        "extract": (pairs, lambda: extract.main(["--shards", str(pairs), "--checkpoint", str(tiny_checkpoint),
                                                 "--out", out, "--no-progress"])),
        "evaluate": (pairs, lambda: evaluate.main(["--shards", str(pairs), "--checkpoint", str(tiny_checkpoint),
                                                   "--split", "train", "--out", out, "--no-progress"])),
        "controller": (latent, lambda: control_train.main(["--latent", str(latent), "--out", out, "--steps", "2"])),
        "rollout": (latent, lambda: play.main(["rollout", "--checkpoint", str(tiny_checkpoint), "--controller",
                                               str(small_controller), "--latent", str(latent), "--split", "train",
                                               "--out", out])),
    }
    for name, (folder, run) in runs.items():
        capsys.readouterr()
        assert run() == 2, name
        captured = capsys.readouterr()
        lines = captured.err.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in captured.err, (name, captured.err[-2000:])
        assert lines[0].startswith(f"error: {folder / 'manifest.json'}: "), (name, lines[0])


# ------------------------------------------------------------------------------------ short and changed shards
def test_an_index_that_lists_other_than_the_manifest_is_one_line(shard_copy):
    index = shard_copy / "train" / "pairs-000001.idx"
    lines = index.read_text().splitlines()
    index.write_text(f"v1.2 {len(lines) - 2}\n" + "\n".join(lines[1:-1]) + "\n")       # one sample fewer
    text = message(lambda: build_loader(shard_copy, "train", 4, backend="torch", device="cpu"))
    assert text.startswith(str(index)) and f"lists {len(lines) - 2} samples, the manifest says {len(lines) - 1}" in text


def test_a_pair_tar_cut_short_is_named_before_any_batch(shard_copy):
    tar = shard_copy / "train" / "pairs-000002.tar"
    samples = read_index(tar.with_suffix(".idx"))
    tar.write_bytes(tar.read_bytes()[: samples[-1].members["cur.png"][0]])        # the last sample's data gone
    text = message(lambda: build_loader(shard_copy, "train", 4, backend="torch", device="cpu"))
    assert text.startswith(f"{tar}: cut short")


def test_a_changed_pair_shard_is_caught_where_extraction_and_evaluation_read(shard_copy):
    tar = shard_copy / "val" / "pairs-000000.tar"
    data = bytearray(tar.read_bytes())
    data[-1] ^= 1                                           # a bit of the end-of-archive padding: still readable
    tar.write_bytes(bytes(data))
    build_loader(shard_copy, "val", 4, backend="torch", device="cpu")         # training: counts only
    text = message(lambda: in_order_loader(shard_copy, "val", 4, grayscale=True, backend="torch", device="cpu"))
    assert text.startswith(f"{tar}: sha256 ") and "differs from the manifest's" in text
    assert in_order_loader(shard_copy, "val", 4, grayscale=True, backend="torch", device="cpu", verify=False)
    with pytest.raises(UserError, match="differs from the manifest's"):
        split_shards(shard_copy, load_manifest(shard_copy, PAIRS_FORMAT), "val", verify=True)


@pytest.fixture
def latent_copy(latent_dir, tmp_path) -> Path:
    out = tmp_path / "latent"
    shutil.copytree(latent_dir, out)
    return out


def test_a_latent_tar_cut_at_a_sample_boundary_without_its_index_is_one_line(latent_copy):
    """tarfile reads a tar cut between samples as a shorter, valid one; with the `.idx` gone only the
    manifest knows: every way of naming the shards checks the count."""
    tar = latent_copy / "train" / "latent-000001.tar"
    samples = read_index(tar.with_suffix(".idx"))
    tar.write_bytes(tar.read_bytes()[: samples[4].members["cur.png"][0] - 512])       # 4 whole samples
    tar.with_suffix(".idx").unlink()
    for source in (latent_copy, latent_urls(latent_copy, "train"), str(tar)):
        text = message(lambda: list(latent_dataset(source, split="train" if source == latent_copy else None)))
        assert text.startswith(str(tar)) and f"holds 4 samples, its manifest lists {len(samples)}" in text, text


def test_latent_shards_verified_on_request(latent_copy):
    tar = latent_copy / "val" / "latent-000000.tar"
    data = bytearray(tar.read_bytes())
    data[-1] ^= 1
    tar.write_bytes(bytes(data))
    assert list(latent_dataset(latent_copy, split="val"))                        # counts hold: reads
    text = message(lambda: list(latent_dataset(latent_copy, split="val", verify=True)))
    assert text.startswith(f"{tar}: sha256 ") and "differs from the manifest's" in text
    assert list(latent_dataset(latent_copy, split="test", verify=True, compressed=True))   # .tar.zst: its own hash


def test_a_latent_source_that_is_not_there_says_so(tmp_path, capsys, tiny_checkpoint, small_controller):
    assert message(lambda: latent_urls(tmp_path / "nowhere")).endswith("not found (expected a latent shard "
                                                                        "directory, a .tar or .tar.zst shard, or "
                                                                        "a brace pattern of them)")
    assert play.main(["rollout", "--checkpoint", str(tiny_checkpoint), "--controller", str(small_controller),
                      "--latent", "/nonexistent", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "error: /nonexistent: not found" in err and "half-written" not in err


def test_a_bad_palette_in_a_latent_manifest_is_refused_where_it_is_read(latent_dir, tmp_path):
    """The latent manifest carries the palette to the rollouts, the play server and train.py's own
    frames: read there, a palette out of schema is one line naming the field, not a black game."""
    from pipeline.palette import Palette

    latent = tmp_path / "latent"
    shutil.copytree(latent_dir, latent)
    edit_manifest(latent, lambda m: m.update(palette={"rgb": [[0, 0, 0]]}))
    text = message(lambda: load_manifest(latent, LATENT_FORMAT))
    assert text.startswith(f"{latent / 'manifest.json'}: palette.rgb: must hold 2 to 64 colours")
    with pytest.raises(ValueError, match="palette.rgb"):          # a dict made elsewhere: the same rule
        Palette.from_json({"rgb": [[0, 0, 0]]})
