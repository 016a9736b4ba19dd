"""pipeline/loader.py: both backends against a PIL reference read straight from the tars, sampling
(every pair once, episode mixing, DDP shares), exact resume, cache on == cache off, frame t-1 with
context=1 (against the pair (t-1, t) found by its json, also after rejected frames), and clear
errors. Real DALI and real DataLoader workers throughout; the shards are the session's `pair_shards`
(and `broken_shards` for rejected frames)."""
from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from common.errors import UserError
from pipeline.loader import build_loader
from pipeline.shards import read_index

BACKENDS = ["dali", "torch"]


# ------------------------------------------------------------------------------------- helpers
def load(shards, split="train", batch_size=16, **options):
    options = {"device": "cpu", "threads": 2, **options}
    return build_loader(shards, split, batch_size, **options)


def take(loader, count=None) -> list[dict]:
    """Batches (copied, so later batches cannot alias them) from a fresh pass over `loader`."""
    batches = []
    for batch in loader:
        batches.append({name: value.clone() if torch.is_tensor(value) else value for name, value in batch.items()})
        if count is not None and len(batches) == count:
            break
    return batches


def assert_same_batches(got: list[dict], expected: list[dict]) -> None:
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        assert a["key"] == b["key"] and a.keys() == b.keys()
        for name in ("cur", "next", "prev", "prev_valid"):
            assert name not in a or torch.equal(a[name], b[name]), name


def split_samples_from_tars(shards: Path, split: str) -> dict[str, dict[str, bytes]]:
    """key -> {"cur.png", "next.png", "json"} of every pair in manifest order, read with tarfile:
    independent of the loader."""
    manifest = json.loads((shards / "manifest.json").read_text())
    samples: dict[str, dict[str, bytes]] = {}
    for shard in manifest["splits"][split]["shards"]:
        with tarfile.open(shards / shard["file"]) as tar:
            for member in tar.getmembers():                                       # tar order
                key, ext = member.name.split(".", 1)
                samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return samples


def split_pairs_from_tars(shards: Path, split: str) -> list[tuple[str, bytes, bytes]]:
    """(key, cur.png, next.png) of every pair in manifest order."""
    return [(key, m["cur.png"], m["next.png"]) for key, m in split_samples_from_tars(shards, split).items()]


def prev_reference(samples: dict[str, dict[str, bytes]]) -> dict[str, tuple[bytes, bool]]:
    """key -> (PNG of frame t-1, whether there is one): the cur.png of the pair whose json says it is
    (same episode, t-1); frame t's own PNG where the split has no such pair."""
    metas = {key: json.loads(m["json"]) for key, m in samples.items()}
    by_position = {(meta["episode"], meta["t"]): key for key, meta in metas.items()}
    reference = {}
    for key, meta in metas.items():
        before = by_position.get((meta["episode"], meta["t"] - 1))
        reference[key] = (samples[before]["cur.png"], True) if before else (samples[key]["cur.png"], False)
    return reference


def assert_prev_matches_reference(batches: list[dict], reference: dict[str, tuple[bytes, bool]],
                                  grayscale: bool = True) -> None:
    for batch in batches:
        assert batch["prev"].shape == batch["cur"].shape and batch["prev"].dtype == batch["cur"].dtype
        assert batch["prev_valid"].dtype == torch.bool and batch["prev_valid"].shape == (len(batch["key"]),)
        expected = [reference[key] for key in batch["key"]]
        assert torch.equal(batch["prev"], pil_reference([png for png, _ in expected], grayscale))
        assert batch["prev_valid"].tolist() == [valid for _, valid in expected]
        # where there is no frame t-1, frame t stands in
        assert torch.equal(batch["prev"][~batch["prev_valid"]], batch["cur"][~batch["prev_valid"]])


def pil_reference(pngs: list[bytes], grayscale: bool) -> torch.Tensor:
    """PIL's convert("L"/"RGB") / 255 as (N, C, H, W), built in one go (many tiny torch ops are slow
    on a busy 2-core box)."""
    pixels = np.stack([np.asarray(Image.open(io.BytesIO(png)).convert("L" if grayscale else "RGB")) for png in pngs])
    tensor = torch.from_numpy(pixels).float() / 255
    return tensor[:, None] if grayscale else tensor.permute(0, 3, 1, 2)


def episode_of(key: str) -> str:
    return key.rsplit("_", 1)[0]


def mean_distinct_episodes(batches: list[dict]) -> float:
    return float(np.mean([len({episode_of(key) for key in batch["key"]}) for batch in batches]))


# ------------------------------------------------------------------------------ pixels and order
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("grayscale", [True, False], ids=["gray", "rgb"])
def test_in_order_pass_matches_pil_reference(pair_shards, backend, grayscale):
    """The extraction walk (shuffle=False, drop_last=False, keys): every pair, in manifest order,
    bit-identical to PIL's convert("L"/"RGB") / 255, shaped (B, C, 210, 160) float32."""
    expected = split_pairs_from_tars(pair_shards, "val")
    loader = load(pair_shards, "val", batch_size=16, backend=backend, grayscale=grayscale,
                  shuffle=False, drop_last=False, with_keys=True)
    batches = take(loader)
    assert len(batches) == len(loader) == -(-len(expected) // 16)
    assert [key for batch in batches for key in batch["key"]] == [key for key, _, _ in expected]
    channels = 1 if grayscale else 3
    cur = torch.cat([batch["cur"] for batch in batches])
    nxt = torch.cat([batch["next"] for batch in batches])
    assert cur.dtype == torch.float32 and cur.shape == (len(expected), channels, 210, 160)
    assert torch.equal(cur, pil_reference([png for _, png, _ in expected], grayscale))
    assert torch.equal(nxt, pil_reference([png for _, _, png in expected], grayscale))


def test_every_pair_once_per_epoch_in_a_fresh_order(pair_shards):
    all_keys = sorted(key for key, _, _ in split_pairs_from_tars(pair_shards, "train"))
    loader = load(pair_shards, batch_size=16, backend="torch", drop_last=False, with_keys=True)
    epochs = [[key for batch in take(loader) for key in batch["key"]] for _ in range(2)]
    for keys in epochs:
        assert sorted(keys) == all_keys
    assert epochs[0] != epochs[1]

    dropping = load(pair_shards, batch_size=16, backend="torch", drop_last=True, with_keys=True)
    keys = [key for batch in take(dropping) for key in batch["key"]]
    assert len(dropping) == len(all_keys) // 16 and len(keys) == len(dropping) * 16
    assert len(set(keys)) == len(keys) and set(keys) <= set(all_keys)


def test_shuffle_mixes_episodes(pair_shards):
    """Shards hold episodes in order, so reading them in order puts one or two episodes in a batch;
    the global permutation draws a batch from all of them."""
    episodes = len({episode_of(key) for key, _, _ in split_pairs_from_tars(pair_shards, "train")})
    shuffled = take(load(pair_shards, batch_size=32, backend="torch", with_keys=True))
    in_order = take(load(pair_shards, batch_size=32, backend="torch", with_keys=True, shuffle=False))
    assert mean_distinct_episodes(in_order) < 2.0
    assert mean_distinct_episodes(shuffled) >= min(episodes, 32) - 1
    assert mean_distinct_episodes(shuffled) >= 1.5 * mean_distinct_episodes(in_order)


@pytest.mark.parametrize("world_size", [2, 3])
def test_rank_shares_are_disjoint_and_complete(pair_shards, world_size):
    all_keys = sorted(key for key, _, _ in split_pairs_from_tars(pair_shards, "train"))
    ranks = range(world_size)
    complete = [load(pair_shards, backend="dali", rank=r, world_size=world_size, drop_last=False, with_keys=True)
                for r in ranks]
    equal = [load(pair_shards, backend="dali", rank=r, world_size=world_size, drop_last=True, with_keys=True)
             for r in ranks]
    assert len({len(loader) for loader in equal}) == 1              # DDP needs the same step count
    for _ in range(2):                                               # shares are re-drawn every epoch
        shares = [[key for batch in take(loader) for key in batch["key"]] for loader in complete]
        assert sorted(key for share in shares for key in share) == all_keys
        shares = [[key for batch in take(loader) for key in batch["key"]] for loader in equal]
        flat = [key for share in shares for key in share]
        assert len(flat) == len(set(flat)) == len(equal[0]) * 16 * world_size


# ------------------------------------------------------------------------------------ resume
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("where", ["mid-epoch", "epoch-end", "next-epoch"])
def test_resume_yields_what_the_uninterrupted_loader_would(pair_shards, backend, where):
    options = dict(split="val", batch_size=8, backend=backend, seed=7, with_keys=True)   # val: small and quick
    reference = load(pair_shards, **options)
    per_epoch = len(reference)
    uninterrupted = take(reference) + take(reference)                # epochs 0 and 1
    stop = {"mid-epoch": per_epoch // 2, "epoch-end": per_epoch, "next-epoch": per_epoch + 2}[where]

    interrupted = load(pair_shards, **options)
    batches = interrupted.forever()                                  # as train.py walks its loader
    for _ in range(stop):
        next(batches)
    state = interrupted.state_dict()

    resumed = load(pair_shards, **options)
    resumed.load_state_dict(state)
    end_of_epoch = (stop // per_epoch + 1) * per_epoch
    assert_same_batches(take(resumed), uninterrupted[stop:end_of_epoch])
    if end_of_epoch == per_epoch:                                    # and the next epoch follows
        assert_same_batches(take(resumed), uninterrupted[per_epoch:])


@pytest.mark.parametrize("backend", BACKENDS)
def test_mid_epoch_resume_with_context_yields_the_same_prev(pair_shards, backend):
    options = dict(split="val", batch_size=8, backend=backend, seed=5, with_keys=True, context=1)
    reference = load(pair_shards, **options)
    uninterrupted = take(reference)
    stop = len(reference) // 2
    interrupted = load(pair_shards, **options)
    take(interrupted, stop)
    resumed = load(pair_shards, **options)
    resumed.load_state_dict(interrupted.state_dict())
    assert_same_batches(take(resumed), uninterrupted[stop:])
    assert all("prev" in batch for batch in uninterrupted)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_pass_left_half_way_ends_its_epoch(pair_shards, tmp_path, backend):
    """train.py's validation stops after a few batches; the next pass starts the next epoch (the
    decoder, stopped mid-pass, starts afresh), and the state survives torch.load(weights_only=True)."""
    options = dict(split="val", batch_size=8, backend=backend, with_keys=True, cache=False)
    reference = load(pair_shards, **options)
    epochs = [take(reference), take(reference)]
    loader = load(pair_shards, **options)
    assert "key" not in next(iter(load(pair_shards, "val", 8, backend="torch")))
    assert_same_batches(take(loader, 2), epochs[0][:2])
    torch.save(loader.state_dict(), tmp_path / "state.pt")
    assert_same_batches(take(loader), epochs[1])
    resumed = load(pair_shards, **options)
    resumed.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    assert_same_batches(take(resumed), epochs[0][2:])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cache", [True, False], ids=["cache", "stream"])
def test_a_pass_leaves_the_global_torch_rng_alone(pair_shards, backend, cache):
    # The trainer checkpoints the global RNG; a validation pass or a rebuilt loader that drew from it
    # would make a resumed run differ from an uninterrupted one.
    torch.manual_seed(123)
    before = torch.get_rng_state()
    take(load(pair_shards, "val", backend=backend, cache=cache, drop_last=False))
    assert torch.equal(torch.get_rng_state(), before)


def test_loading_a_state_from_another_loader_configuration_is_refused(pair_shards):
    state = load(pair_shards, backend="torch", batch_size=16).state_dict()
    other = load(pair_shards, backend="torch", batch_size=8)
    with pytest.raises(UserError, match="batch_size"):
        other.load_state_dict(state)


# ---------------------------------------------------------------------- backends and the cache
@pytest.mark.parametrize("context", [0, 1])
def test_dali_and_torch_backends_give_identical_batches(pair_shards, context):
    dali = take(load(pair_shards, backend="dali", seed=3, with_keys=True, drop_last=False, context=context))
    plain = take(load(pair_shards, backend="torch", seed=3, with_keys=True, drop_last=False, context=context))
    assert ("prev" in dali[0]) == bool(context)
    assert_same_batches(dali, plain)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("context", [0, 1])
def test_cache_on_equals_cache_off(pair_shards, backend, context):
    options = dict(split="val", backend=backend, with_keys=True, grayscale=False, context=context)
    cached, streamed = load(pair_shards, cache=True, **options), load(pair_shards, cache=False, **options)
    assert cached.cached and not streamed.cached
    for _ in range(2):                     # the first pass fills the cache, the second reads it
        assert_same_batches(take(cached), take(streamed))


def test_cache_follows_the_budget(pair_shards):
    index_frames = load(pair_shards, backend="torch").index.num_frames
    assert load(pair_shards, backend="torch").cached                       # small split, default budget
    assert not load(pair_shards, backend="torch", cache_budget_gb=1e-6).cached
    # every frame sits in two pairs but is decoded (and cached) once
    pairs = load(pair_shards, backend="torch").index.num_pairs
    assert index_frames < 1.2 * pairs


# ------------------------------------------------------------------------ frame t-1 (context=1)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cache", [True, False], ids=["cache", "stream"])
def test_prev_is_frame_t_minus_1_of_the_same_episode(pair_shards, backend, cache):
    """Every pair of a shuffled epoch: prev is the cur.png of the pair (t-1, t) of its episode (by
    the pairs' json), bit for bit; at each episode's first pair it is frame t, with prev_valid False."""
    samples = split_samples_from_tars(pair_shards, "train")
    reference = prev_reference(samples)
    batches = take(load(pair_shards, backend=backend, cache=cache, context=1, with_keys=True, drop_last=False))
    assert sorted(key for batch in batches for key in batch["key"]) == sorted(samples)
    assert_prev_matches_reference(batches, reference)

    valid = {key: bool(v) for batch in batches for key, v in zip(batch["key"], batch["prev_valid"])}
    metas = {key: json.loads(m["json"]) for key, m in samples.items()}
    first_pairs = {episode: min(meta["t"] for meta in metas.values() if meta["episode"] == episode)
                   for episode in {meta["episode"] for meta in metas.values()}}
    # the recordings have no gaps: exactly the first pair of each episode has no frame t-1
    assert sorted(key for key, v in valid.items() if not v) == sorted(
        key for key, meta in metas.items() if meta["t"] == first_pairs[meta["episode"]])


@pytest.mark.parametrize("backend", BACKENDS)
def test_prev_is_never_a_rejected_or_missing_frame(broken_shards, backend):
    """After a frame the packer rejected (or a gap in the numbering) the next pair has no frame t-1:
    prev is frame t, prev_valid False; every other pair's prev is the reference frame t-1."""
    manifest = json.loads((broken_shards / "manifest.json").read_text())
    bad = {tuple(path.rsplit("/", 1)) for path in [r["file"] for r in manifest["rejected"]] + manifest["missing"]}
    after_bad = 0
    for split in ("train", "val", "test"):
        samples = split_samples_from_tars(broken_shards, split)
        batches = take(load(broken_shards, split, backend=backend, context=1, with_keys=True, shuffle=False,
                            drop_last=False))
        assert_prev_matches_reference(batches, prev_reference(samples))
        for batch in batches:
            for key, valid in zip(batch["key"], batch["prev_valid"].tolist()):
                meta = json.loads(samples[key]["json"])
                if (meta["episode"], f"{meta['t'] - 1}.png") in bad:
                    after_bad += 1
                    assert not valid, key
    assert after_bad >= 6          # A: after 5, 8, 20, 30; B: after 3, 10, 12, 30


def test_context_changes_no_sampling_and_no_rank_share(pair_shards):
    """context=1 adds prev to the same batches: same pairs, same cur and next, per DDP rank."""
    for rank in range(2):
        options = dict(backend="torch", seed=4, with_keys=True, rank=rank, world_size=2)
        plain, with_prev = take(load(pair_shards, **options)), take(load(pair_shards, context=1, **options))
        assert_same_batches([{k: v for k, v in b.items() if k not in ("prev", "prev_valid")} for b in with_prev],
                            plain)
        assert "prev" not in plain[0] and "prev_valid" not in plain[0]


class DecodeLog:
    """Wraps a loader's decoder: the frame ids of every job it is asked to decode."""

    def __init__(self, loader):
        self.jobs: list[np.ndarray] = []
        decode = loader.decoder.decode

        def logged(jobs):
            self.jobs += [np.asarray(job) for job in jobs]
            return decode(jobs)

        loader.decoder.decode = logged


def test_cache_serves_prev_without_decoding_a_frame_twice(pair_shards):
    loader = load(pair_shards, backend="torch", cache=True, context=1)
    log = DecodeLog(loader)
    take(loader), take(loader)
    decoded = np.concatenate(log.jobs)
    assert np.array_equal(np.sort(decoded), np.arange(loader.index.num_frames))


def test_streamed_batches_decode_each_of_their_frames_once(pair_shards):
    loader = load(pair_shards, "val", batch_size=8, backend="torch", cache=False, context=1, shuffle=False,
                  drop_last=False)
    log = DecodeLog(loader)
    take(loader)
    index, batches = loader.index, loader.schedule.batches(0)
    assert len(log.jobs) == len(batches)
    for job, pairs in zip(log.jobs, batches):
        needed = np.concatenate([index.cur[pairs], index.next[pairs], index.prev[pairs]])
        assert len(job) == len(set(job.tolist())) and set(job.tolist()) == set(needed.tolist())
    # in order, a batch's prev frames are its own cur frames but for the first: about one frame a pair
    assert sum(len(job) for job in log.jobs) <= index.num_frames + 2 * len(batches)


@pytest.mark.parametrize("context", [2, -1])
def test_context_beyond_one_frame_is_refused(pair_shards, context):
    with pytest.raises(UserError, match=rf"context must be 0 \(frames t, t\+1\) or 1 \(frame t-1 too\), got {context}"):
        load(pair_shards, backend="torch", context=context)


# ----------------------------------------------------------------------------------- errors
@pytest.fixture
def shard_copy(pair_shards, tmp_path) -> Path:
    copy = tmp_path / "pairs"
    shutil.copytree(pair_shards, copy)
    return copy


def first_train_shard(shards: Path) -> dict:
    return json.loads((shards / "manifest.json").read_text())["splits"]["train"]["shards"][0]


def test_missing_shard_directory(tmp_path):
    with pytest.raises(UserError, match=str(tmp_path / "nowhere")):
        load(tmp_path / "nowhere")


def test_missing_split(pair_shards):
    with pytest.raises(UserError, match="no split 'holdout'"):
        load(pair_shards, "holdout")


def test_manifest_of_another_format(shard_copy):
    manifest = json.loads((shard_copy / "manifest.json").read_text())
    (shard_copy / "manifest.json").write_text(json.dumps({**manifest, "format": "lam-latent/1"}))
    with pytest.raises(UserError, match="lam-latent/1"):
        load(shard_copy)


@pytest.mark.parametrize("member", ["file", "index"])
def test_missing_shard_or_index(shard_copy, member):
    missing = shard_copy / first_train_shard(shard_copy)[member]
    missing.unlink()
    with pytest.raises(UserError, match=str(missing)):
        load(shard_copy)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cache", [True, False], ids=["cache", "stream"])
@pytest.mark.parametrize("damage", ["zeroed", "flipped-byte"])
def test_corrupt_png_is_named(shard_copy, backend, cache, damage):
    shard = first_train_shard(shard_copy)
    sample = read_index(shard_copy / shard["index"])[3]
    offset, size = sample.members["next.png"]
    with open(shard_copy / shard["file"], "r+b") as tar:     # same size, so the index still fits
        if damage == "zeroed":
            tar.seek(offset)
            tar.write(b"\0" * size)
        else:                                                 # one byte inside the image data
            tar.seek(offset + size // 2)
            byte = tar.read(1)[0]
            tar.seek(offset + size // 2)
            tar.write(bytes([byte ^ 0x40]))
    loader = load(shard_copy, backend=backend, cache=cache)
    with pytest.raises(UserError, match=rf"{shard['file']}: member {sample.key}\.next\.png is not a readable PNG"):
        take(loader)


def test_runs_are_walked_in_order_each_in_batches_of_its_own(pair_shards):
    """Extraction's and evaluation's walk: given runs of pair positions, in order, and no batch spans
    two runs (a shard's batches do not depend on which other shards are walked)."""
    from pipeline.loader import RunSchedule, in_order_loader

    schedule = RunSchedule(((0, 5), (5, 7), (10, 13)), batch_size=3)
    assert [b.tolist() for b in schedule.batches(0)] == [[0, 1, 2], [3, 4], [5, 6], [10, 11, 12]]
    assert schedule.batches_per_epoch == 4 and [b.tolist() for b in schedule.batches(0, 3)] == [[10, 11, 12]]
    whole = next(iter(in_order_loader(pair_shards, "val", 20, grayscale=True, backend="torch", device="cpu")))
    runs = in_order_loader(pair_shards, "val", 4, grayscale=True, backend="torch", device="cpu",
                           runs=[(3, 9), (12, 14)])
    batches = list(runs)
    assert [len(b["key"]) for b in batches] == [4, 2, 2] and len(runs) == 3
    positions = [3, 4, 5, 6, 7, 8, 12, 13]
    assert [k for b in batches for k in b["key"]] == [whole["key"][i] for i in positions]
    assert torch.equal(torch.cat([b["next"] for b in batches]), whole["next"][positions])


# ------------------------------------------------------------------------------ model input, backends
def test_model_input_is_each_byte_divided_by_255_correctly_rounded():
    """The one normalisation every loader and device shares: byte k becomes the float32 nearest to
    k / 255 (what a GPU must also give; tests/test_cuda.py holds it there)."""
    from pipeline.frames import to_model_input

    values = torch.arange(256, dtype=torch.uint8).reshape(1, 16, 16, 1)
    exact = (torch.arange(256, dtype=torch.float64) / 255).to(torch.float32).reshape(1, 1, 16, 16)
    assert torch.equal(to_model_input(values), exact)


def test_auto_backend_is_dali_where_it_imports_and_torch_elsewhere(monkeypatch):
    import sys

    from pipeline.loader import resolve_backend

    assert resolve_backend("torch") == ("torch", "--backend torch")
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)           # an import of it now fails
    assert resolve_backend("auto") == ("torch", "auto: DALI is not installed here")
    assert resolve_backend(None)[0] == "torch"


def test_train_without_dali_runs_on_the_torch_loader_and_says_so(pair_shards, tmp_path, monkeypatch, capsys):
    """No --backend on a machine without DALI: the trainer picks the PyTorch loader (the GPU box the
    issue was found on had no DALI, and train.py refused to start)."""
    import sys

    import train

    monkeypatch.setitem(sys.modules, "nvidia.dali", None)
    assert train.main(["--shards", str(pair_shards), "--preset", "tiny", "--set", "backend=auto", "--iters", "2",
                       "--out", str(tmp_path / "ckpt"), "--run-dir", str(tmp_path / "run"), "--no-compile",
                       "--wandb", "disabled"]) == 0
    assert "loader: torch (auto: DALI is not installed here)" in capsys.readouterr().out
    saved = torch.load(tmp_path / "ckpt" / "step-000002.pt", weights_only=True)
    assert saved["config"]["train"]["backend"] == "torch"
