"""pipeline/stream.py: the downstream webdataset reader of latent shards, `.tar` and `.tar.zst`, with
and without frame t-1 (`prev`, from a model with context)."""
from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from common.errors import UserError
from pipeline.frames import to_model_input
from pipeline.shards import iter_samples, read_index
from pipeline.stream import decode_png, latent_dataset, latent_urls


@pytest.fixture(scope="module")
def manifest(latent_dir):
    return json.loads((latent_dir / "manifest.json").read_text())


@pytest.fixture(scope="module")
def raw_samples(latent_dir, manifest):
    """key -> members, every split, read straight from the tars through their indexes."""
    samples = {}
    for split in ("train", "val", "test"):
        for shard in manifest["splits"][split]["shards"]:
            samples.update(iter_samples(latent_dir / shard["file"], latent_dir / shard["index"]))
    return samples


def keys(dataset):
    return [sample["key"] for sample in dataset]


def test_reads_every_sample_in_manifest_order_with_the_right_tensors(latent_dir, raw_samples):
    samples = list(latent_dataset(latent_dir, split_workers=False, split_nodes=False))
    assert [s["key"] for s in samples] == list(raw_samples)
    for sample in samples[:: max(1, len(samples) // 12)]:
        raw = raw_samples[sample["key"]]
        assert sample["cur"].dtype == torch.float32 and sample["cur"].shape == (1, 210, 160)
        assert sample["next"].shape == (1, 210, 160)
        assert 0 <= float(sample["cur"].min()) and float(sample["cur"].max()) <= 1
        assert sample["codes"].dtype == torch.int64 and sample["codes"].shape == (7, 5)
        assert np.array_equal(sample["codes"].numpy(), np.load(io.BytesIO(raw["codes.npy"])))
        rgb = torch.from_numpy(np.array(Image.open(io.BytesIO(raw["next.png"])).convert("RGB")))
        assert torch.equal(sample["next"], to_model_input(rgb, grayscale=True))   # the shared preprocessing


def test_shards_without_frame_t_minus_1_yield_no_prev(latent_dir):
    sample = next(iter(latent_dataset(latent_dir, split="val")))
    batch = next(iter(latent_dataset(latent_dir, split="val", batch_size=4)))
    assert "prev" not in sample and "prev_valid" not in sample and "prev" not in batch and "prev_valid" not in batch


@pytest.mark.parametrize("compressed", [False, True], ids=["tar", "tar.zst"])
def test_latent_round_trip_keeps_prev(context_latent_dir, compressed):
    """Samples and batches carry prev (frame t-1, the stored prev.png through the shared
    preprocessing) and prev_valid (the json's), from .tar and .tar.zst alike."""
    manifest = json.loads((context_latent_dir / "manifest.json").read_text())
    raw = {key: m for shard in manifest["splits"]["val"]["shards"]
           for key, m in iter_samples(context_latent_dir / shard["file"], context_latent_dir / shard["index"])}
    samples = list(latent_dataset(context_latent_dir, split="val", compressed=compressed))
    assert [s["key"] for s in samples] == list(raw)
    for sample in samples:
        members = raw[sample["key"]]
        expected = torch.from_numpy(np.array(Image.open(io.BytesIO(members["prev.png"])).convert("L")))[None] / 255
        assert sample["prev"].shape == sample["cur"].shape == (1, 210, 160)
        assert torch.equal(sample["prev"], expected)
        assert sample["prev_valid"] == json.loads(members["json"])["prev_valid"]
    assert [s["prev_valid"] for s in samples].count(False) == len(manifest["splits"]["val"]["episodes"])
    batches = list(latent_dataset(context_latent_dir, split="val", compressed=compressed, batch_size=8))
    assert torch.equal(torch.cat([b["prev"] for b in batches]), torch.stack([s["prev"] for s in samples]))
    assert batches[0]["prev_valid"].dtype == torch.bool
    assert torch.cat([b["prev_valid"] for b in batches]).tolist() == [s["prev_valid"] for s in samples]


def test_decoding_and_shared_gray_match_pil(raw_samples):
    for raw in list(raw_samples.values())[:20]:
        rgb = torch.from_numpy(np.array(Image.open(io.BytesIO(raw["cur.png"])).convert("RGB")))
        assert torch.equal(decode_png(raw["cur.png"]), rgb)
        gray = torch.from_numpy(np.array(Image.open(io.BytesIO(raw["cur.png"])).convert("L")))[..., None]
        assert torch.equal(to_model_input(decode_png(raw["cur.png"]), grayscale=True), to_model_input(gray))


def test_zstd_shards_read_the_same_as_tars(latent_dir, manifest):
    plain = list(latent_dataset(latent_dir, split="val"))
    packed = list(latent_dataset(latent_dir, split="val", compressed=True))
    zst_urls = [str(latent_dir / s["zstd"]["file"]) for s in manifest["splits"]["val"]["shards"]]
    assert all(url.endswith(".tar.zst") for url in zst_urls)
    explicit = list(latent_dataset(zst_urls))
    assert len(plain) == manifest["splits"]["val"]["pairs"] > 0
    for a, b, c in zip(plain, packed, explicit):
        assert a["key"] == b["key"] == c["key"]
        for name in ("cur", "codes", "next"):
            assert torch.equal(a[name], b[name]) and torch.equal(a[name], c[name])


def test_sources_dir_split_list_brace_and_single_file(latent_dir, manifest):
    test_shards = manifest["splits"]["test"]["shards"]
    files = [str(latent_dir / s["file"]) for s in test_shards]
    everything = keys(latent_dataset(latent_dir, split="test"))
    assert len(everything) == manifest["splits"]["test"]["pairs"]
    assert keys(latent_dataset(files)) == everything
    assert keys(latent_dataset(files[0])) == everything[:test_shards[0]["pairs"]]
    assert len(test_shards) >= 2
    pattern = str(latent_dir / "test" / f"latent-{{000000..{len(test_shards) - 1:06d}}}.tar")
    assert latent_urls(pattern) == files
    assert keys(latent_dataset(pattern)) == everything


def test_batches_and_rgb(latent_dir, manifest):
    batches = list(latent_dataset(latent_dir, split="val", batch_size=16, with_meta=True))
    pairs = manifest["splits"]["val"]["pairs"]
    assert sum(len(b["key"]) for b in batches) == pairs
    first = batches[0]
    assert first["cur"].shape == (16, 1, 210, 160) and first["codes"].shape == (16, 7, 5)
    assert first["meta"][0]["checkpoint"]["step"] == 20
    dropped = list(latent_dataset(latent_dir, split="val", batch_size=pairs - 1, partial_batches=False))
    assert len(dropped) == 1
    rgb = next(iter(latent_dataset(latent_dir, grayscale=False, split="val")))
    assert rgb["cur"].shape == (3, 210, 160)


def test_ddp_ranks_get_disjoint_shares(latent_dir, monkeypatch):
    everything = keys(latent_dataset(latent_dir, split="train"))
    shares = []
    for rank in range(2):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        shares.append(keys(latent_dataset(latent_dir, split="train")))
    assert shares[0] and shares[1] and not set(shares[0]) & set(shares[1])
    assert sorted(shares[0] + shares[1]) == sorted(everything)


def test_dataloader_workers_split_the_shards(latent_dir):
    everything = keys(latent_dataset(latent_dir, split="train"))
    loader = torch.utils.data.DataLoader(latent_dataset(latent_dir, split="train", batch_size=8),
                                         batch_size=None, num_workers=2)
    seen = [key for batch in loader for key in batch["key"]]
    assert sorted(seen) == sorted(everything) and len(seen) == len(set(seen))


def test_shuffle_is_seeded_and_complete(latent_dir):
    ordered = keys(latent_dataset(latent_dir, split="train"))
    first = keys(latent_dataset(latent_dir, split="train", shuffle=64, seed=1))
    again = keys(latent_dataset(latent_dir, split="train", shuffle=64, seed=1))
    other = keys(latent_dataset(latent_dir, split="train", shuffle=64, seed=2))
    assert first == again and first != ordered and first != other
    assert sorted(first) == sorted(ordered)


def test_clear_errors(tmp_path, latent_dir):
    with pytest.raises(UserError, match="manifest not found"):
        latent_urls(tmp_path)
    with pytest.raises(UserError, match="no split 'dev'"):
        latent_urls(latent_dir, split="dev")
    pairs_like = tmp_path / "pairs"
    pairs_like.mkdir()
    (pairs_like / "manifest.json").write_text(json.dumps({"format": "lam-pairs/1", "splits": {}}))
    with pytest.raises(UserError, match="lam-latent/1"):
        latent_urls(pairs_like)


def test_a_half_written_latent_tar_is_one_clear_error(latent_dir, tmp_path):
    shard = sorted((latent_dir / "train").glob("latent-*.tar"))[0]
    half = tmp_path / "latent-000000.tar"
    half.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2 + 100])     # cut inside a member
    half.with_suffix(".idx").write_bytes(shard.with_suffix(".idx").read_bytes())
    with pytest.raises(UserError, match=r"latent-000000\.tar: latent shard holds \d+ samples, its index lists 16: "
                                        r"cut short"):
        list(latent_dataset(str(half)))


def test_a_latent_tar_cut_between_samples_is_one_clear_error(latent_dir, tmp_path):
    """tarfile reads a tar cut at a member boundary as a shorter, valid one: the index tells."""
    shard = sorted((latent_dir / "train").glob("latent-*.tar"))[0]
    samples = read_index(shard.with_suffix(".idx"))
    cut = tmp_path / "latent-000000.tar"
    cut.write_bytes(shard.read_bytes()[: samples[3].members["cur.png"][0] - 512])   # before sample 3's header
    cut.with_suffix(".idx").write_bytes(shard.with_suffix(".idx").read_bytes())
    with pytest.raises(UserError, match=rf"latent-000000\.tar: latent shard holds 3 samples, its index lists "
                                        rf"{len(samples)}: cut short"):
        list(latent_dataset(str(cut)))


# ------------------------------------------------------------------------------------ codes in range
def npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def rewrite_shard(tar: Path, change) -> tuple[list[str], str]:
    """Rewrite a latent tar with `change(members)` applied to each sample's members, its index with
    it (a shard a user edited and re-indexed: only the codes' own checks can tell); its keys and sha256."""
    from pipeline.shards import TarShardWriter

    samples = list(iter_samples(tar, tar.with_suffix(".idx")))
    tar.unlink()
    with TarShardWriter(tar) as writer:
        for key, members in samples:
            change(members)
            writer.add(key, members)
    return [key for key, _ in samples], writer.result.sha256


def rewrite_latent_shard(latent: Path, shard_file: str, change) -> list[str]:
    """`rewrite_shard` on one shard of the latent folder `latent`, and its sha256 in the manifest."""
    keys_written, sha256 = rewrite_shard(latent / shard_file, change)
    manifest = json.loads((latent / "manifest.json").read_text())
    for split in manifest["splits"].values():
        for shard in split["shards"]:
            if shard["file"] == shard_file:
                shard["sha256"] = sha256
    (latent / "manifest.json").write_text(json.dumps(manifest))
    return keys_written


def first_test_shard(latent: Path) -> str:
    return json.loads((latent / "manifest.json").read_text())["splits"]["test"]["shards"][0]["file"]


def plus_256(members: dict) -> None:
    codes = np.load(io.BytesIO(members["codes.npy"]))
    members["codes.npy"] = npy(codes.astype(np.uint16) + 256)


def test_codes_that_are_not_the_manifests_are_one_error_naming_the_shard_and_sample(latent_dir, tmp_path):
    """Every code +256, stored as uint16 (a rollout on them scored as the real codes: the FSQ lookup
    wrapped them): the reader refuses them where it reads them, naming the shard and the sample,
    by their type and, where the type could hold them, by the codebook's size."""
    from control.data import read_episodes

    latent = tmp_path / "latent"
    shutil.copytree(latent_dir, latent)
    shard = first_test_shard(latent)
    first_key = rewrite_latent_shard(latent, shard, plus_256)[0]
    with pytest.raises(UserError) as raised:
        list(latent_dataset(latent, split="test"))
    assert str(raised.value).startswith(f"{latent / shard}: sample {first_key}: codes.npy holds uint16, expected uint8")
    manifest = json.loads((latent / "manifest.json").read_text())
    manifest["code_dtype"] = "uint16"                   # as if the codebook needed uint16: the size still tells
    (latent / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match=rf"^{latent / shard}: sample {first_key}: codes\.npy holds code \d+, but "
                                        rf"there are 256 codes \(0\.\.255\)$"):
        read_episodes(latent, "test", grayscale=True)


def test_signed_or_float_codes_are_refused_even_without_a_manifest(latent_dir, tmp_path):
    """A loose shard (no manifest beside it to give the codebook's size): the stored type still
    bounds the codes, and a float or signed grid is no stored type."""
    loose = tmp_path / "loose" / "test"
    loose.mkdir(parents=True)
    shard = latent_dir / first_test_shard(latent_dir)
    shutil.copy(shard, loose / shard.name)
    shutil.copy(shard.with_suffix(".idx"), loose / shard.with_suffix(".idx").name)
    keys_written, _ = rewrite_shard(loose / shard.name, float_codes)
    with pytest.raises(UserError, match=rf"sample {keys_written[0]}: codes\.npy holds float64, expected uint8 or "
                                        rf"uint16"):
        list(latent_dataset(str(loose / shard.name)))


def float_codes(members: dict) -> None:
    members["codes.npy"] = npy(np.load(io.BytesIO(members["codes.npy"])).astype(np.float64) + 0.5)
