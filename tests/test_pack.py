"""Pair shards from bulk_videos/: round trip, pairing rules, splits, reproducible tars that DALI and
webdataset read, every kind of bad input (lenient and --strict), and crash safety."""
from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from common.errors import UserError, run_cli
from pipeline import pack as packer
from pipeline.pack import Frame, assign_splits, check_frame, pack, split_counts
from pipeline.shards import iter_samples, load_manifest, sha256_file

from bad_frames import copy_episode, make_broken_videos, rewrite_idat

ROOT = Path(__file__).resolve().parents[1]


def shard_samples(out: Path, manifest: dict, split: str):
    for shard in manifest["splits"][split]["shards"]:
        yield from iter_samples(out / shard["file"], out / shard["index"])


def all_samples(out: Path, manifest: dict):
    for split in packer.SPLITS:
        for key, members in shard_samples(out, manifest, split):
            yield split, key, members


def pairs_by_episode(out: Path, manifest: dict) -> dict[str, list[int]]:
    found: dict[str, list[int]] = {}
    for _, _, members in all_samples(out, manifest):
        meta = json.loads(members["json"])
        found.setdefault(meta["episode"], []).append(meta["t"])
    return found


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


# ------------------------------------------------------------------------------- good input
def test_round_trip_keeps_source_bytes(videos, pair_shards):
    manifest = load_manifest(pair_shards, "lam-pairs/1")
    episodes = sorted(p.name for p in videos.iterdir())
    seen = 0
    for split, key, members in all_samples(pair_shards, manifest):
        meta = json.loads(members["json"])
        episode, t = meta["episode"], meta["t"]
        assert key == f"{episodes.index(episode):05d}_{t:06d}" and "." not in key
        assert episode in manifest["splits"][split]["episodes"]
        assert members["cur.png"] == (videos / episode / f"{t}.png").read_bytes()
        assert members["next.png"] == (videos / episode / f"{t + 1}.png").read_bytes()
        recorded = json.loads((videos / episode / "meta.jsonl").read_text().splitlines()[t])
        assert meta == {**recorded, "episode": episode, "t": t}
        assert members["json"] == json.dumps(meta, sort_keys=True, separators=(",", ":")).encode()
        seen += 1
    frames = sum(len(list((videos / e).glob("*.png"))) for e in episodes)
    assert seen == frames - len(episodes) == sum(s["pairs"] for s in manifest["splits"].values())
    assert manifest["rejected"] == manifest["missing"] == manifest["converted"] == []
    assert manifest["frame"] == {"height": 210, "width": 160}


def test_shards_hold_runs_of_consecutive_pairs_in_episode_order(pair_shards):
    manifest = load_manifest(pair_shards, "lam-pairs/1")
    for split in packer.SPLITS:
        shards = manifest["splits"][split]["shards"]
        assert [s["file"] for s in shards] == [f"{split}/pairs-{i:06d}.tar" for i in range(len(shards))]
        assert all(s["pairs"] == 16 for s in shards[:-1]) and 0 < shards[-1]["pairs"] <= 16
        for shard in shards:
            assert sha256_file(pair_shards / shard["file"]) == shard["sha256"]
        keys = [key for key, _ in shard_samples(pair_shards, manifest, split)]
        assert keys == sorted(keys) and len(keys) == manifest["splits"][split]["pairs"]
        runs = [(int(a[:5]), int(b[:5]), int(a[6:]), int(b[6:])) for a, b in zip(keys, keys[1:])]
        assert all(t2 == t1 + 1 for e1, e2, t1, t2 in runs if e1 == e2)


def test_split_is_by_episode_every_split_non_empty(videos, pair_shards):
    splits = load_manifest(pair_shards, "lam-pairs/1")["splits"]
    episodes = [splits[s]["episodes"] for s in packer.SPLITS]
    assert sorted(sum(episodes, [])) == sorted(p.name for p in videos.iterdir())
    assert [len(e) for e in episodes] == [4, 1, 1]


@pytest.mark.parametrize("n, fractions, expected", [
    (10, (0.8, 0.1, 0.1), [8, 1, 1]), (3, (0.8, 0.1, 0.1), [1, 1, 1]), (2, (0.8, 0.1, 0.1), [1, 1, 0]),
    (1, (0.8, 0.1, 0.1), [1, 0, 0]), (100, (0.7, 0.2, 0.1), [70, 20, 10]), (5, (1, 0, 0), [5, 0, 0]),
    (7, (0.5, 0.5, 0), [4, 3, 0])])
def test_split_counts(n, fractions, expected):
    assert split_counts(n, fractions) == expected


def test_split_is_deterministic_for_a_seed():
    names = [f"episode {i}" for i in range(40)]
    assert assign_splits(names, 0, (0.8, 0.1, 0.1)) == assign_splits(list(names), 0, (0.8, 0.1, 0.1))
    assert assign_splits(names, 0, (0.8, 0.1, 0.1)) != assign_splits(names, 1, (0.8, 0.1, 0.1))
    assert [assign_splits(names, 0, (0.8, 0.1, 0.1)).count(s) for s in packer.SPLITS] == [32, 4, 4]


def test_tars_are_reproducible_across_runs_and_worker_counts(videos, pair_shards, tmp_path):
    again = tmp_path / "again"
    manifest = pack(videos, again, pairs_per_shard=16, workers=2, progress=False)
    assert tree_bytes(again) == tree_bytes(pair_shards)
    other_seed = pack(videos, tmp_path / "seed1", seed=1, pairs_per_shard=16, progress=False)
    assert other_seed["splits"]["val"]["episodes"] != manifest["splits"]["val"]["episodes"]


def test_numeric_frame_order_and_odd_folder_names(videos, tmp_path):
    src = tmp_path / "src"
    names = ["run [1] (copy)", "épisode.2 – ünïcode", "a.b.c"]
    for i, name in enumerate(names):
        copy_episode(videos, i, src / name)
    (src / names[0] / "notes.txt").write_text("not a frame")
    (src / names[0] / "thumb.jpg").write_bytes(b"\xff\xd8")
    (src / names[0] / "12.png.bak").write_bytes(b"old")
    (src / ".hidden").mkdir()                       # not an episode
    manifest = pack(src, tmp_path / "out", progress=False)
    found = pairs_by_episode(tmp_path / "out", manifest)
    assert sorted(found) == sorted(names)
    assert found[names[0]] == list(range(48))       # ..., (9, 10), (10, 11), ... in numeric order
    samples = {key: m for _, key, m in all_samples(tmp_path / "out", manifest)}
    index = sorted(names).index(names[0])
    assert samples[f"{index:05d}_000009"]["next.png"] == (src / names[0] / "10.png").read_bytes()
    assert not manifest["rejected"] and not manifest["missing"]


def test_dali_reads_shards_through_their_index(pair_shards):
    from nvidia.dali import fn, pipeline_def

    manifest = load_manifest(pair_shards, "lam-pairs/1")
    shard = manifest["splits"]["train"]["shards"][1]
    expected = [(m["json"], m["cur.png"]) for _, m in iter_samples(pair_shards / shard["file"], pair_shards / shard["index"])]

    @pipeline_def(batch_size=len(expected), num_threads=1, device_id=None)
    def read():
        cur, nxt, meta = fn.readers.webdataset(
            paths=[str(pair_shards / shard["file"])], index_paths=[str(pair_shards / shard["index"])],
            ext=["cur.png", "next.png", "json"], missing_component_behavior="error", name="reader")
        return meta, fn.decoders.image(cur, device="cpu"), fn.decoders.image(nxt, device="cpu")

    pipe = read()
    pipe.build()
    assert pipe.epoch_size("reader") == shard["pairs"] == len(expected)
    metas, curs, _ = pipe.run()
    for i, (meta, cur) in enumerate(expected):
        assert bytes(np.asarray(metas[i])) == meta
        assert np.array_equal(np.asarray(curs[i]), pixels(cur))


def test_webdataset_library_reads_shards(pair_shards):
    import webdataset as wds

    manifest = load_manifest(pair_shards, "lam-pairs/1")
    shard = manifest["splits"]["val"]["shards"][0]
    expected = list(iter_samples(pair_shards / shard["file"], pair_shards / shard["index"]))
    read = list(wds.WebDataset(str(pair_shards / shard["file"]), shardshuffle=False))
    assert [s["__key__"] for s in read] == [key for key, _ in expected]
    assert all(s["cur.png"] == m["cur.png"] and s["json"] == m["json"] for s, (_, m) in zip(read, expected))


# ------------------------------------------------------------------------------- bad input
@pytest.fixture
def broken(videos, tmp_path) -> Path:
    """Four episodes with every kind of bad and unusual frame (see the expectations below)."""
    return make_broken_videos(videos, tmp_path / "broken")


BROKEN_REJECTED = {"A bad bytes/5.png": "not a PNG", "A bad bytes/8.png": "truncated PNG",
                   "A bad bytes/20.png": "not a PNG", "A bad bytes/030.png": "duplicate frame number 30",
                   "A bad bytes/30.png": "duplicate frame number 30", "B [gaps].v2/3.png": "wrong size 100x80",
                   "B [gaps].v2/12.png": "corrupt PNG (bad CRC", "B [gaps].v2/30.png": "truncated PNG (image data"}
BROKEN_CONVERTED = [f"C converted/{n}.png" for n in (1, 2, 3, 4)]


def test_lenient_pack_rejects_bad_frames_and_keeps_the_rest(broken, videos, tmp_path, capsys):
    out = tmp_path / "out"
    manifest = pack(broken, out, progress=False)
    rejected = {r["file"]: r["reason"] for r in manifest["rejected"]}
    assert rejected.keys() == BROKEN_REJECTED.keys()
    assert all(rejected[f].startswith(reason) for f, reason in BROKEN_REJECTED.items())
    assert manifest["missing"] == ["B [gaps].v2/10.png"]
    assert manifest["converted"] == BROKEN_CONVERTED
    assert manifest["episodes_without_pairs"] == ["D one frame"]
    assert manifest["warnings"] == ["B [gaps].v2/meta.jsonl: line 49 is not valid JSON"]
    assert "packed without its labels" in capsys.readouterr().err

    found = pairs_by_episode(out, manifest)
    everything = set(range(48))
    assert set(found["A bad bytes"]) == everything - {4, 5, 7, 8, 19, 20, 29, 30}
    assert set(found["B [gaps].v2"]) == everything - {2, 3, 9, 10, 11, 12, 29, 30}
    assert set(found["C converted"]) == everything
    assert "D one frame" not in found
    for _, _, members in all_samples(out, manifest):
        meta = json.loads(members["json"])
        assert ("action" in meta) == (meta["episode"] != "B [gaps].v2")    # its malformed labels are dropped
        if meta["episode"] == "C converted" and meta["t"] in (1, 2, 3):
            source = sorted(videos.iterdir())[2] / f"{meta['t']}.png"
            image = pixels(members["cur.png"])
            original = np.asarray(Image.open(source))
            if meta["t"] == 1:
                assert np.array_equal(image, np.asarray(Image.open(source).convert("L").convert("RGB")))
            elif meta["t"] == 2:
                assert np.array_equal(image, original)
            else:
                assert np.array_equal(image, np.asarray(Image.open(source).quantize(16).convert("RGB")))
            assert Image.open(io.BytesIO(members["cur.png"])).mode == "RGB"
        if meta["episode"] == "C converted" and meta["t"] == 3:
            gray = np.asarray(Image.open(sorted(videos.iterdir())[2] / "4.png").convert("L"))
            assert np.array_equal(pixels(members["next.png"]), np.stack([gray] * 3, -1))


def test_strict_names_every_bad_file_and_writes_nothing(broken, tmp_path, capsys):
    out = tmp_path / "out"
    code = run_cli(packer.main, ["--src", str(broken), "--out", str(out), "--strict", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: --strict")
    for name in [*BROKEN_REJECTED, "B [gaps].v2/10.png", "B [gaps].v2/meta.jsonl"]:
        assert name in err
    assert not any(name in err for name in BROKEN_CONVERTED)        # conversions are not problems
    assert not out.exists()


def test_strict_failure_leaves_a_previous_pack_untouched(broken, videos, tmp_path):
    out = tmp_path / "out"
    pack(videos, out, pairs_per_shard=40, progress=False)
    before = tree_bytes(out)
    with pytest.raises(UserError):
        pack(broken, out, strict=True, progress=False)
    assert tree_bytes(out) == before and sorted(p.name for p in out.iterdir()) == sorted(
        ["manifest.json", "train", "val", "test"])


def test_strict_accepts_clean_input_with_conversions(videos, tmp_path):
    src = tmp_path / "src"
    c = copy_episode(videos, 0, src / "gray")
    for n in range(3):
        Image.open(c / f"{n}.png").convert("L").save(c / f"{n}.png")
    manifest = pack(src, tmp_path / "out", strict=True, progress=False)
    assert manifest["converted"] == ["gray/0.png", "gray/1.png", "gray/2.png"]
    assert manifest["splits"]["train"]["pairs"] == 48


def test_fast_check_catches_what_a_decode_would():
    frame = np.zeros((210, 160, 3), np.uint8)
    frame[100:104, 50:52] = (200, 72, 72)
    good = png_bytes(Image.fromarray(frame))

    def reason(data: bytes, name="x.png") -> str | None:
        path = Path(os.environ.get("TMPDIR", "/tmp")) / f"lam-check-{os.getpid()}-{name}"
        path.write_bytes(data)
        try:
            return check_frame(path, Frame(0, name), 210, 160).problem
        finally:
            path.unlink()

    assert reason(good) is None
    assert reason(good[:-12]) == "truncated PNG"                               # IEND missing
    bad_filter = rewrite_idat(good, lambda body: zlib.compress(b"\x07" + zlib.decompress(body)[1:]))
    assert reason(bad_filter) == "corrupt PNG (unknown row filter)"
    short = rewrite_idat(good, lambda body: zlib.compress(zlib.decompress(body)[:-481]))
    assert reason(short).startswith("corrupt PNG (image data has")
    assert reason(rewrite_idat(good, lambda body: body[:2] + b"\xff" * 10 + body[12:])).startswith("corrupt PNG")


@pytest.mark.parametrize("flags, message", [
    (["--fractions", "0.5,0.5,0.5"], "sum to 1"), (["--fractions", "1.2,-0.1,-0.1"], "non-negative"),
    (["--fractions", "0.8,0.2"], "3 numbers"), (["--fractions", "a,b,c"], "three numbers"),
    (["--pairs-per-shard", "0"], "--pairs-per-shard must be >= 1"), (["--workers", "0"], "--workers must be >= 1")])
def test_bad_flags_are_one_line_and_exit_2(videos, tmp_path, capsys, flags, message):
    code = run_cli(packer.main, ["--src", str(videos), "--out", str(tmp_path / "out"), *flags])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and message in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_missing_or_empty_src_is_a_clear_error(tmp_path, videos, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    loose = tmp_path / "loose"
    loose.mkdir()
    shutil.copy(sorted(videos.iterdir())[0] / "0.png", loose / "0.png")
    for src, message in ((tmp_path / "nope", "no such folder"), (empty, "no episode folders"),
                         (loose, "one sub-folder per episode")):
        assert run_cli(packer.main, ["--src", str(src), "--out", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1
    assert run_cli(packer.main, ["--src", str(videos), "--out", str(videos / "shards")]) == 2
    assert "inside --src" in capsys.readouterr().err


def test_cli_exit_codes_and_summary(videos, tmp_path):
    run = lambda *args: subprocess.run([sys.executable, "-m", "pipeline.pack", *args],
                                       capture_output=True, text=True)
    bad = run("--src", str(tmp_path / "nope"), "--out", str(tmp_path / "out"))
    assert bad.returncode == 2 and bad.stderr.startswith("error: ") and "Traceback" not in bad.stderr
    good = run("--src", str(videos), "--out", str(tmp_path / "out"), "--workers", "2", "--no-progress")
    assert good.returncode == 0, good.stderr
    assert "packed 288 pairs" in good.stdout and "rejected 0 frames, missing 0, converted 0" in good.stdout


# ------------------------------------------------------------------------------- crash safety
class DiskFull(OSError):
    pass


def fail_after(monkeypatch, calls: int) -> None:
    real_add = packer.TarShardWriter.add
    count = {"n": 0}

    def add(self, key, members):
        count["n"] += 1
        if count["n"] > calls:
            raise DiskFull("No space left on device")
        real_add(self, key, members)

    monkeypatch.setattr(packer.TarShardWriter, "add", add)


def assert_manifest_describes_everything(out: Path) -> None:
    manifest = load_manifest(out, "lam-pairs/1")
    listed = {s["file"] for split in manifest["splits"].values() for s in split["shards"]}
    assert {str(p.relative_to(out)) for p in out.rglob("*.tar")} == listed
    for split in manifest["splits"].values():
        for shard in split["shards"]:
            assert sha256_file(out / shard["file"]) == shard["sha256"]
    assert not [p for p in out.rglob(".*")]          # no staging folder or temp file left behind


def test_crash_mid_pack_leaves_no_tar_and_no_manifest(videos, tmp_path, monkeypatch):
    out = tmp_path / "out"
    fail_after(monkeypatch, 40)
    with pytest.raises(DiskFull):
        pack(videos, out, pairs_per_shard=16, progress=False)
    assert not out.exists() or not list(out.rglob("*"))


def test_crash_mid_repack_keeps_the_old_set_whole(videos, tmp_path, monkeypatch):
    out = tmp_path / "out"
    old = pack(videos, out, pairs_per_shard=16, progress=False)
    before = tree_bytes(out)
    fail_after(monkeypatch, 100)
    with pytest.raises(DiskFull):
        pack(videos, out, seed=1, pairs_per_shard=8, progress=False)
    assert tree_bytes(out) == before
    assert_manifest_describes_everything(out)
    assert load_manifest(out, "lam-pairs/1") == old


def test_crash_before_the_swap_keeps_the_old_set_then_recovers(videos, tmp_path, monkeypatch):
    """The new manifest is written inside the staged set; the swap is one rename of a link after it.
    A crash up to there leaves the old set and its manifest whole; the next run cleans up."""
    out = tmp_path / "out"
    old = pack(videos, out, pairs_per_shard=16, progress=False)
    before = tree_bytes(out)

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(packer, "atomic_write_json", crash)
    with pytest.raises(KeyboardInterrupt):
        pack(videos, out, seed=1, pairs_per_shard=8, progress=False)
    assert tree_bytes(out) == before and load_manifest(out, "lam-pairs/1") == old
    monkeypatch.undo()
    manifest = pack(videos, out, seed=1, pairs_per_shard=8, progress=False)
    assert manifest["seed"] == 1
    assert_manifest_describes_everything(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.v000001", ".out.v000002", "out"]


def test_every_frame_is_checked_exactly_once(videos, tmp_path, monkeypatch):
    checked = []
    real_check = packer.check_frame

    def counting_check(path, frame, height, width):
        checked.append(frame.file)
        return real_check(path, frame, height, width)

    monkeypatch.setattr(packer, "check_frame", counting_check)
    pack(videos, tmp_path / "out", progress=False)
    frames = [f"{e.name}/{f.name}" for e in videos.iterdir() for f in e.glob("*.png")]
    assert sorted(checked) == sorted(frames)


# ------------------------------------------------------------------------------- re-packing under readers
def loader_keys(loader) -> list[str]:
    return [key for batch in loader for key in batch["key"]]


def test_a_reader_finishes_the_set_it_started_on_through_a_repack(videos, tmp_path):
    """A loader (what extraction walks) built on the old set, then a re-pack with other shards,
    then the pass: the loader reads the old set whole, not old offsets in new tars."""
    from pipeline.loader import build_loader

    out = tmp_path / "pairs"
    pack(videos, out, pairs_per_shard=16, progress=False)
    expected = loader_keys(build_loader(out, "train", 8, shuffle=False, drop_last=False, with_keys=True,
                                        backend="torch", device="cpu", cache=False))
    reading = build_loader(out, "train", 8, shuffle=False, drop_last=False, with_keys=True, backend="torch",
                           device="cpu", cache=False)
    manifest = load_manifest(out, "lam-pairs/1")
    new = pack(videos, out, seed=1, pairs_per_shard=5, progress=False)      # other episodes in train
    assert loader_keys(reading) == expected                                 # the old set, whole
    assert sum(1 for _ in shard_samples(manifest.root, manifest, "train")) == len(expected)
    fresh = loader_keys(build_loader(out, "train", 8, shuffle=False, drop_last=False, with_keys=True,
                                     backend="torch", device="cpu", cache=False))
    assert len(fresh) == new["splits"]["train"]["pairs"] and fresh != expected   # a new reader: the new set


def test_repacks_keep_the_current_and_the_previous_set_only(videos, tmp_path):
    out = tmp_path / "pairs"
    for seed in range(3):
        pack(videos, out, seed=seed, pairs_per_shard=64, progress=False)
    assert out.is_symlink() and os.readlink(out) == ".pairs.v000003"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".pairs.v000002", ".pairs.v000003", "pairs"]
    assert load_manifest(out, "lam-pairs/1")["seed"] == 2


def test_a_plain_folder_from_before_versions_becomes_the_previous_set(videos, tmp_path):
    out = tmp_path / "pairs"
    pack(videos, tmp_path / "made", pairs_per_shard=64, progress=False)
    shutil.copytree(tmp_path / "made", out)                  # a real folder, as older packers left it
    (out / ".staging-1").mkdir()                             # with an older packer's leftovers
    before = tree_bytes(out)
    pack(videos, out, seed=1, pairs_per_shard=64, progress=False)
    assert out.is_symlink() and load_manifest(out, "lam-pairs/1")["seed"] == 1
    assert tree_bytes(tmp_path / ".pairs.v000001") == {k: v for k, v in before.items() if ".staging" not in k}


def test_a_folder_of_other_files_is_refused_before_any_work(videos, tmp_path, capsys, monkeypatch):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    monkeypatch.setattr(packer, "write_pairs", lambda *a, **k: pytest.fail("packed into a folder of other files"))
    assert run_cli(packer.main, ["--src", str(videos), "--out", str(out)]) == 2
    assert "holds files that are not a shard set (notes.txt)" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
