"""extract.py: latent shards that round-trip to the model's codes and the pair shards' bytes (and,
for a model with context, frame t-1's), resume by skipping finished shards, refuse to mix
checkpoints, and fail with one clear line on bad input."""
from __future__ import annotations

import io
import json
import shutil

import numpy as np
import pytest
import torch
import zstandard

import extract
from pipeline.frames import to_model_input
from pipeline.shards import iter_samples, read_index, sha256_file


def run_extract(pair_shards, checkpoint, out, *extra):
    # fp32 whatever the CPU, as the latent_dir fixture (an extra --amp comes later and wins)
    return extract.main(["--shards", str(pair_shards), "--checkpoint", str(checkpoint), "--out", str(out),
                         "--batch-size", "24", "--backend", "torch", "--no-progress", "--amp", "off", *extra])


def pair_manifest(pair_shards):
    return json.loads((pair_shards / "manifest.json").read_text())


def output_files(out):
    return {path: path.stat().st_mtime_ns for path in sorted(out.rglob("*")) if path.is_file()}


def decode(png: bytes) -> torch.Tensor:
    from PIL import Image

    return to_model_input(torch.from_numpy(np.array(Image.open(io.BytesIO(png)).convert("RGB"))))


def test_one_latent_shard_per_pair_shard_with_the_same_pairs(pair_shards, latent_dir, tiny_checkpoint):
    pairs = pair_manifest(pair_shards)
    latent = json.loads((latent_dir / "manifest.json").read_text())
    assert latent["format"] == "lam-latent/1"
    assert latent["checkpoint"]["sha256"] == sha256_file(tiny_checkpoint)
    assert latent["checkpoint"]["step"] == 20 and latent["checkpoint"]["color"] == "gray"
    assert latent["checkpoint"]["context"] == 0
    assert set(latent["splits"]) == set(pairs["splits"]) == {"train", "val", "test"}
    for split, info in pairs["splits"].items():
        mine = latent["splits"][split]
        assert mine["pairs"] == info["pairs"] and mine["episodes"] == info["episodes"]
        assert [s["pairs"] for s in mine["shards"]] == [s["pairs"] for s in info["shards"]]
        assert [s["source"] for s in mine["shards"]] == [s["file"] for s in info["shards"]]
        for shard in mine["shards"]:
            assert sha256_file(latent_dir / shard["file"]) == shard["sha256"]
            assert len(read_index(latent_dir / shard["index"])) == shard["pairs"]


def test_samples_hold_the_pair_bytes_and_the_models_codes(pair_shards, latent_dir, tiny_checkpoint):
    from model import load_checkpoint

    lam = load_checkpoint(tiny_checkpoint, "cpu")
    checkpoint_sha = sha256_file(tiny_checkpoint)
    latent = json.loads((latent_dir / "manifest.json").read_text())
    checked = 0
    for split, info in pair_manifest(pair_shards)["splits"].items():
        for source, mine in zip(info["shards"], latent["splits"][split]["shards"]):
            originals = list(iter_samples(pair_shards / source["file"], pair_shards / source["index"]))
            written = list(iter_samples(latent_dir / mine["file"], latent_dir / mine["index"]))
            assert [k for k, _ in written] == [k for k, _ in originals]
            cur = torch.stack([decode(m["cur.png"]) for _, m in originals])
            nxt = torch.stack([decode(m["next.png"]) for _, m in originals])
            expected = lam.encode(cur, nxt)
            for (key, members), (_, original), want in zip(written, originals, expected):
                assert set(members) == {"cur.png", "next.png", "codes.npy", "json"}
                assert members["cur.png"] == original["cur.png"] and members["next.png"] == original["next.png"]
                codes = np.load(io.BytesIO(members["codes.npy"]), allow_pickle=False)
                assert codes.dtype == np.uint8 and codes.shape == (7, 5) and codes.flags.c_contiguous
                assert np.array_equal(codes, want.numpy()), key
                meta = json.loads(members["json"])
                assert meta == {**json.loads(original["json"]), "checkpoint": {"sha256": checkpoint_sha, "step": 20}}
                checked += 1
    assert checked == sum(info["pairs"] for info in pair_manifest(pair_shards)["splits"].values())


def test_zstd_copies_decompress_to_the_tars(latent_dir, capsys):
    latent = json.loads((latent_dir / "manifest.json").read_text())
    for info in latent["splits"].values():
        for shard in info["shards"]:
            packed = (latent_dir / shard["zstd"]["file"]).read_bytes()
            assert shard["zstd"]["bytes"] == len(packed)
            assert zstandard.ZstdDecompressor().decompress(packed) == (latent_dir / shard["file"]).read_bytes()


def test_rerun_with_the_same_checkpoint_touches_nothing(pair_shards, latent_dir, tiny_checkpoint, capsys):
    before = output_files(latent_dir)
    assert run_extract(pair_shards, tiny_checkpoint, latent_dir, "--zstd") == 0
    assert "0 shards written" in capsys.readouterr().out
    after = output_files(latent_dir)
    assert after.keys() == before.keys()
    # the manifest is rewritten (same content); every shard, index and record keeps its mtime
    assert {p: t for p, t in after.items() if p.name != "manifest.json"} == \
           {p: t for p, t in before.items() if p.name != "manifest.json"}


def test_resume_redoes_only_missing_or_damaged_shards(pair_shards, tiny_checkpoint, latent_dir, tmp_path, capsys):
    out = tmp_path / "latent"
    shutil.copytree(latent_dir, out)
    missing = out / "train" / "latent-000001.tar"
    damaged = out / "val" / "latent-000000.tar"
    want_missing, want_damaged = missing.read_bytes(), damaged.read_bytes()
    missing.unlink()
    middle = len(want_damaged) // 2
    damaged.write_bytes(want_damaged[:middle] + bytes([want_damaged[middle] ^ 0xFF]) + want_damaged[middle + 1:])
    (out / "manifest.json").unlink()                      # as after a crash
    before = output_files(out)
    assert run_extract(pair_shards, tiny_checkpoint, out) == 0
    assert "2 shards written" in capsys.readouterr().out
    assert missing.read_bytes() == want_missing           # reproducible, byte for byte
    assert damaged.read_bytes() == want_damaged
    untouched = [p for p in before if p.suffix == ".tar" and p != damaged]
    assert all(p.stat().st_mtime_ns == before[p] for p in untouched)
    assert (out / "manifest.json").is_file()


def test_another_checkpoint_is_refused_without_overwrite(pair_shards, tiny_checkpoint, latent_dir, tmp_path, capsys):
    out = tmp_path / "latent"
    shutil.copytree(latent_dir, out)
    other = tiny_checkpoint.parent / "step-000010.pt"
    before = output_files(out)
    assert run_extract(pair_shards, other, out) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "another checkpoint" in err and "--overwrite" in err
    assert output_files(out) == before

    assert run_extract(pair_shards, other, out, "--overwrite") == 0
    latent = json.loads((out / "manifest.json").read_text())
    assert latent["checkpoint"]["sha256"] == sha256_file(other) and latent["checkpoint"]["step"] == 10
    assert not list(out.rglob("*.tar.zst"))               # the old model's copies went with it
    records = [json.loads(p.read_text()) for p in out.rglob("*.done.json")]
    assert records and all(r["checkpoint"]["sha256"] == sha256_file(other) for r in records)


@pytest.mark.parametrize("problem", ["no_shards", "foreign_manifest", "no_checkpoint", "corrupt_checkpoint"])
def test_bad_input_is_one_clear_line(problem, pair_shards, tiny_checkpoint, tmp_path, capsys):
    shards, checkpoint = pair_shards, tiny_checkpoint
    if problem == "no_shards":
        shards = tmp_path / "nowhere"
    elif problem == "foreign_manifest":
        shards = tmp_path / "shards"
        shards.mkdir()
        (shards / "manifest.json").write_text(json.dumps({"format": "something-else/9"}))
    elif problem == "no_checkpoint":
        checkpoint = tmp_path / "missing.pt"
    else:
        checkpoint = tmp_path / "corrupt.pt"
        checkpoint.write_bytes(tiny_checkpoint.read_bytes()[:2000])
    out = tmp_path / "out"
    assert run_extract(shards, checkpoint, out) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1
    assert {"no_shards": "not found", "foreign_manifest": "lam-pairs/1", "no_checkpoint": "checkpoint not found",
            "corrupt_checkpoint": "not a readable checkpoint"}[problem] in err
    assert not (out / "manifest.json").exists()


def same_shards(out, reference_dir) -> bool:
    mine = json.loads((out / "manifest.json").read_text())
    reference = json.loads((reference_dir / "manifest.json").read_text())
    return all([s["sha256"] for s in mine["splits"][split]["shards"]] == [s["sha256"] for s in info["shards"]]
               for split, info in reference["splits"].items())


def test_dali_and_torch_loaders_give_byte_identical_shards(pair_shards, tiny_checkpoint, latent_dir, tmp_path):
    """Reproducible output whatever decodes the frames: the DALI path writes the same bytes."""
    pytest.importorskip("nvidia.dali")
    out = tmp_path / "latent"
    assert extract.main(["--shards", str(pair_shards), "--checkpoint", str(tiny_checkpoint), "--out", str(out),
                         "--backend", "dali", "--batch-size", "24", "--no-progress"]) == 0
    assert same_shards(out, latent_dir)


@pytest.mark.parametrize("batch_size", ["5", "40"])
def test_any_batch_size_gives_byte_identical_shards(batch_size, pair_shards, tiny_checkpoint, latent_dir, tmp_path):
    """The default (fp32) promise: every encoder call is padded to one shape, and a pair's codes do not
    depend on its neighbours, so another --batch-size writes the same bytes (latent_dir used 24)."""
    out = tmp_path / "latent"
    assert extract.main(["--shards", str(pair_shards), "--checkpoint", str(tiny_checkpoint), "--out", str(out),
                         "--backend", "torch", "--batch-size", batch_size, "--no-progress"]) == 0
    assert same_shards(out, latent_dir)


def test_extraction_is_fp32_by_default_even_where_bf16_is_native(pair_shards, tiny_checkpoint, latent_dir, tmp_path,
                                                                  monkeypatch, capsys):
    """Only an explicit --amp trades the byte promise for speed: with native bf16 (injected) the
    default still writes fp32's bytes and measures nothing."""
    import model.precision

    monkeypatch.setattr(model.precision, "native_bf16", lambda device: "amx_bf16")
    monkeypatch.setattr(model.precision, "measure_agreement", lambda *a, **k: pytest.fail("measured"))
    out = tmp_path / "latent"
    assert extract.main(["--shards", str(pair_shards), "--checkpoint", str(tiny_checkpoint), "--out", str(out),
                         "--backend", "torch", "--batch-size", "24", "--no-progress"]) == 0
    assert "extract: precision fp32 (--amp off)" in capsys.readouterr().out
    assert same_shards(out, latent_dir)


def test_bf16_extraction_runs_and_mostly_agrees_with_fp32(pair_shards, tiny_checkpoint, latent_dir, tmp_path, capsys):
    """The bf16 path, forced (emulated on a CPU without native bf16: slow, so the tiny model): it
    writes a complete set whose codes agree with fp32's in nearly every cell, with no byte promise."""
    out = tmp_path / "latent"
    assert run_extract(pair_shards, tiny_checkpoint, out, "--amp", "bf16") == 0
    assert "extract: precision bf16 (--amp bf16)" in capsys.readouterr().out
    from pipeline.stream import latent_dataset

    low = {s["key"]: s["codes"] for s in latent_dataset(out, split="test")}
    full = {s["key"]: s["codes"] for s in latent_dataset(latent_dir, split="test")}
    assert low.keys() == full.keys()
    agree = np.mean([torch.equal(low[key], full[key]) for key in full])
    assert agree >= 0.8, f"only {agree:.0%} of the test pairs have all their codes as in fp32"


def test_a_checkpoint_of_another_architecture_is_one_clear_error(pair_shards, tiny_checkpoint, tmp_path, capsys):
    state = torch.load(tiny_checkpoint, weights_only=True)
    state["config"]["model"]["code_dim"] = 64                 # says one architecture, holds another
    foreign = tmp_path / "foreign.pt"
    torch.save(state, foreign)
    assert run_extract(pair_shards, foreign, tmp_path / "latent") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {foreign}: weights do not match the saved architecture")


def test_a_half_written_latent_tar_is_redone(pair_shards, tiny_checkpoint, latent_dir, tmp_path):
    out = tmp_path / "latent"
    shutil.copytree(latent_dir, out)
    shard = sorted((out / "train").glob("latent-*.tar"))[1]
    whole = shard.read_bytes()
    shard.write_bytes(whole[: len(whole) // 2])                # its .done.json still claims it finished
    assert run_extract(pair_shards, tiny_checkpoint, out) == 0
    assert shard.read_bytes() == whole


def test_a_context_models_samples_hold_frame_t_minus_1(pair_shards, context_latent_dir, context_checkpoint):
    """prev.png is the source bytes of frame t-1: the cur.png of the pair (same episode, t-1) found by
    its json, wherever that pair's shard is; frame t's bytes and prev_valid False at an episode's
    first pair. The codes are the model's given that frame t-1."""
    from model import load_checkpoint

    lam = load_checkpoint(context_checkpoint, "cpu")
    latent = json.loads((context_latent_dir / "manifest.json").read_text())
    assert lam.config.context == 1 and latent["checkpoint"]["context"] == 1
    firsts = 0
    for split, info in pair_manifest(pair_shards)["splits"].items():
        originals = {key: m for source in info["shards"]
                     for key, m in iter_samples(pair_shards / source["file"], pair_shards / source["index"])}
        by_position = {(meta["episode"], meta["t"]): key
                       for key, meta in ((k, json.loads(m["json"])) for k, m in originals.items())}
        written = {key: m for shard in latent["splits"][split]["shards"]
                   for key, m in iter_samples(context_latent_dir / shard["file"], context_latent_dir / shard["index"])}
        assert list(written) == list(originals)
        for key, members in written.items():
            assert list(members) == ["cur.png", "next.png", "prev.png", "codes.npy", "json"]
            pair_meta = json.loads(originals[key]["json"])
            before = by_position.get((pair_meta["episode"], pair_meta["t"] - 1))
            assert members["prev.png"] == originals[before or key]["cur.png"], key
            assert json.loads(members["json"]) == {**pair_meta, "prev_valid": before is not None,
                                                   "checkpoint": {"sha256": sha256_file(context_checkpoint),
                                                                  "step": 10}}
            firsts += before is None
        keys = list(written)
        cur, nxt, prev = (torch.stack([decode(written[k][m]) for k in keys]) for m in ("cur.png", "next.png", "prev.png"))
        stored = np.stack([np.load(io.BytesIO(written[k]["codes.npy"])) for k in keys])
        assert np.array_equal(stored, lam.encode(cur, nxt, prev).numpy())
    assert firsts == sum(len(info["episodes"]) for info in pair_manifest(pair_shards)["splits"].values())


def test_a_codebook_past_256_is_stored_uint16_and_read_back_whole(pair_shards, tmp_path):
    """512 codes (FSQ levels 8 x 8 x 8): codes.npy is uint16, the manifest says so, and the stream
    reader gives back the model's codes, those >= 256 included (a uint8 grid would wrap them)."""
    import train
    from model import load_checkpoint
    from pipeline.stream import latent_dataset

    assert train.main(["--shards", str(pair_shards), "--preset", "tiny", "--out", str(tmp_path / "ckpt"),
                       "--run-dir", str(tmp_path / "run"), "--iters", "2", "--no-compile", "--wandb", "disabled",
                       "--set", "ckpt_every=2", "--set", "fsq.levels=8,8,8"]) == 0
    # Two steps leave every cell on one code below 256; the top FSQ digit (basis 64) pushed to its
    # highest level puts every code at 448 or above.
    state = torch.load(tmp_path / "ckpt" / "step-000002.pt", weights_only=True)
    state["model"]["quantizer.down.bias"][2] = 10.0
    checkpoint, out = tmp_path / "high-codes.pt", tmp_path / "latent"
    torch.save(state, checkpoint)
    assert run_extract(pair_shards, checkpoint, out) == 0
    latent = json.loads((out / "manifest.json").read_text())
    assert latent["code_dtype"] == "uint16" and latent["checkpoint"]["codebook_size"] == 512
    lam = load_checkpoint(checkpoint, "cpu")
    originals = {key: m for source in pair_manifest(pair_shards)["splits"]["val"]["shards"]
                 for key, m in iter_samples(pair_shards / source["file"], pair_shards / source["index"])}
    keys = list(originals)
    expected = lam.encode(*(torch.stack([decode(originals[k][m]) for k in keys]) for m in ("cur.png", "next.png")))
    shard = latent["splits"]["val"]["shards"][0]
    _, members = next(iter_samples(out / shard["file"], out / shard["index"]))
    assert np.load(io.BytesIO(members["codes.npy"])).dtype == np.uint16
    read = {sample["key"]: sample["codes"] for sample in latent_dataset(out, split="val")}
    assert list(read) == keys
    assert torch.equal(torch.stack([read[k] for k in keys]), expected)
    assert int(expected.max()) >= 256


# ------------------------------------------------------------------------------------ precision
@pytest.mark.parametrize("faithful", [False, True])
def test_native_bf16_is_used_only_where_it_agrees_with_fp32(faithful, pair_shards, tiny_checkpoint, latent_dir,
                                                            tmp_path, monkeypatch, capsys):
    """With native bf16 (injected) `--amp auto` measures agreement and writes bf16 codes only when it
    passes the bars (injected too); otherwise the output is fp32's, byte for byte."""
    import model.precision
    from model.precision import Agreement

    monkeypatch.setattr(model.precision, "native_bf16", lambda device: "amx_bf16")
    measured = Agreement(64, 0.999 if faithful else 0.98, 30.0, 29.99, 60.0)
    monkeypatch.setattr(model.precision, "measure_agreement", lambda lam, batches, device: measured)
    out = tmp_path / "latent"
    assert run_extract(pair_shards, tiny_checkpoint, out, "--amp", "auto") == 0
    printed = capsys.readouterr().out
    assert f"extract: precision {'bf16' if faithful else 'fp32'} (auto: native bf16 (amx_bf16)" in printed
    assert ("faithful: codes 99.90% equal" if faithful else "not faithful enough: codes 98.00% equal") in printed
    test_shard = json.loads((out / "manifest.json").read_text())["splits"]["test"]["shards"][0]
    written = list(iter_samples(out / test_shard["file"], out / test_shard["index"]))
    if not faithful:
        assert (out / test_shard["file"]).read_bytes() == (latent_dir / test_shard["file"]).read_bytes()
        return
    from model import load_checkpoint

    lam = load_checkpoint(tiny_checkpoint, "cpu")
    cur = torch.stack([decode(m["cur.png"]) for _, m in written])
    nxt = torch.stack([decode(m["next.png"]) for _, m in written])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = lam.encode(cur, nxt)
    got = torch.stack([torch.from_numpy(np.load(io.BytesIO(m["codes.npy"])).astype(np.int64)) for _, m in written])
    # bf16 makes no byte promise (its kernels may round a batch of another shape differently): nearly all
    assert (got == want).float().mean() >= 0.99


def test_agreement_of_the_tiny_model_on_its_sample(pair_shards, tiny_checkpoint):
    """The real measurement (bf16 emulated where the CPU has none): a fixed sample of the test split."""
    from model import load_checkpoint
    from model.precision import agreement_batches, measure_agreement

    manifest = pair_manifest(pair_shards)
    batches = agreement_batches(pair_shards, manifest, grayscale=True, context=0, device=torch.device("cpu"), pairs=32)
    measured = measure_agreement(load_checkpoint(tiny_checkpoint, "cpu"), batches, torch.device("cpu"))
    assert measured.pairs == min(32, manifest["splits"]["test"]["pairs"])
    assert 0.5 < measured.code_cells <= 1 and measured.gap_db < 1 and measured.psnr_between > 30


def test_the_latent_manifest_names_a_source_that_repacks_keep(videos, tiny_checkpoint, tmp_path):
    """`source.shards` is the pair folder as named (a link a re-pack swaps), not the hidden version
    folder behind it, which the re-pack after next removes; `manifest_sha256` tells which set."""
    from pipeline.pack import pack

    pairs = tmp_path / "shards" / "pairs"
    pack(videos, pairs, seed=0, pairs_per_shard=16, workers=1, progress=False)
    assert run_extract(pairs, tiny_checkpoint, tmp_path / "latent") == 0
    source = json.loads((tmp_path / "latent" / "manifest.json").read_text())["source"]
    for _ in range(2):                                   # the version folder extraction read is gone after these
        pack(videos, pairs, seed=0, pairs_per_shard=16, workers=1, progress=False)
    assert source["shards"] == str(pairs)
    assert sha256_file(pairs / "manifest.json") == source["manifest_sha256"]     # the same input: the same set
