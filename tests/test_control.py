"""control/: the action -> code controller: checkpoint format, the streamed training data, training."""
from __future__ import annotations

import torch
import pytest

from common.errors import UserError
from control import CONTROLLER_FORMAT, Controller, ControllerConfig, load_controller, save_controller
from control import train as control_train
from control.data import read_episodes, samples_with_prev
from pipeline.actions import ACTION_NAMES

SMALL = dict(channels=(4, 8, 8, 8, 8), hidden=16, action_dim=8)


def frames(batch: int) -> torch.Tensor:
    return torch.rand(batch, 1, 210, 160, generator=torch.Generator().manual_seed(batch))


# ------------------------------------------------------------------------------------ network + checkpoint
def test_controller_gives_a_code_grid_per_action():
    controller = Controller(ControllerConfig(**SMALL)).eval()
    logits = controller(frames(3), torch.tensor([0, 2, 3]), frames(3))
    assert logits.shape == (3, 256, 7, 5)
    codes = controller.codes(frames(3), torch.tensor([0, 2, 3]))
    assert codes.shape == (3, 7, 5) and codes.dtype == torch.int64 and int(codes.max()) < 256
    sampled = controller.codes(frames(3), torch.tensor([1, 1, 1]), temperature=1.0,
                               generator=torch.Generator().manual_seed(0))
    assert sampled.shape == (3, 7, 5)


def test_checkpoint_round_trip_is_weights_only_and_atomic(tmp_path):
    controller = Controller(ControllerConfig(**SMALL)).eval()
    path = save_controller(tmp_path / "ckpt" / "controller.pt", controller, step=7,
                           lam={"sha256": "ab" * 32, "step": 3}, train_config={"steps": 7})
    raw = torch.load(path, weights_only=True)           # tensors and plain values only
    assert raw["format"] == CONTROLLER_FORMAT and raw["step"] == 7 and raw["config"]["channels"] == [4, 8, 8, 8, 8]
    assert [p.name for p in path.parent.iterdir()] == ["controller.pt"]     # no temp file left behind
    loaded = load_controller(path)
    assert loaded.step == 7 and loaded.lam["step"] == 3 and not loaded.training
    cur, action = frames(2), torch.tensor([2, 3])
    assert torch.equal(loaded(cur, action, cur), controller(cur, action, cur))


def test_codes_are_the_most_likely_grid_seen_in_training(tmp_path):
    """With seen grids the answer is the seen grid whose cells' log-probabilities sum highest (checked
    by brute force), never a grid outside them; per_cell (or no seen grids) is each cell's argmax.
    The grids travel in the checkpoint; a checkpoint from before them loads with none."""
    from collections import Counter
    from control.network import grid_bytes, most_common_grids

    controller = Controller(ControllerConfig(**SMALL)).eval()
    cur, action = frames(4), torch.tensor([0, 1, 2, 3])
    per_cell = controller.codes(cur, action, cur)
    seen = torch.randint(0, 256, (50, 35), generator=torch.Generator().manual_seed(0))
    seen[7] = per_cell[2].flatten()                         # one frame's own argmax is among them
    counts = Counter({key: 50 - i for i, key in enumerate(grid_bytes(seen.view(-1, 7, 5)))})
    controller.set_seen_grids(most_common_grids(counts, 40))
    assert torch.equal(controller.seen_grids.long(), seen[:40])     # most common first, limited
    chosen = controller.codes(cur, action, cur)
    log_probs = controller(cur, action, cur).log_softmax(1).flatten(2)              # (B, 256, 35)
    brute = torch.stack([log_probs[:, grid, torch.arange(35)].sum(-1) for grid in seen[:40]], 1)
    assert torch.equal(chosen.flatten(1), seen[:40][brute.argmax(1)])
    assert torch.equal(chosen[2], per_cell[2])              # its own argmax is the best grid there is
    assert torch.equal(controller.codes(cur, action, cur, per_cell=True), per_cell)
    sampled = controller.codes(cur, action, cur, temperature=1.0, generator=torch.Generator().manual_seed(0))
    assert all(any(torch.equal(grid, s) for s in seen[:40]) for grid in sampled.flatten(1))

    path = save_controller(tmp_path / "controller.pt", controller, step=1)
    assert torch.equal(load_controller(path).seen_grids, controller.seen_grids)
    raw = torch.load(path, weights_only=True)
    del raw["model"]["seen_grids"]                          # as saved before grids were kept
    torch.save(raw, tmp_path / "old.pt")
    old = load_controller(tmp_path / "old.pt")
    assert len(old.seen_grids) == 0 and torch.equal(old.codes(cur, action, cur), per_cell)


def test_unusable_checkpoints_are_one_clear_error(tmp_path, tiny_checkpoint):
    with pytest.raises(UserError, match="not found"):
        load_controller(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="not a readable controller checkpoint"):
        load_controller(tmp_path / "junk.pt")
    with pytest.raises(UserError, match="expected 'lam-controller/1'"):
        load_controller(tiny_checkpoint)                  # a LAM checkpoint is not a controller


# ------------------------------------------------------------------------------------ data
def test_stream_carries_actions_and_the_previous_frame(latent_dir):
    samples = list(samples_with_prev(latent_dir, "train", grayscale=True, urls_seed=None))
    assert samples and all(0 <= s["action"] < len(ACTION_NAMES) for s in samples)
    for before, after in zip(samples, samples[1:]):
        consecutive = (before["meta"]["episode"] == after["meta"]["episode"]
                       and after["meta"]["t"] == before["meta"]["t"] + 1)
        assert torch.equal(after["prev"], before["cur"] if consecutive else after["cur"])
        if consecutive:
            assert torch.equal(after["cur"], before["next"])


def test_stream_uses_the_stored_previous_frame(context_latent_dir):
    """Latents of a LAM with context hold frame t-1: it is the controller's prev even at the first
    sample of a shard read after another episode's shard (shard order shuffled)."""
    from pipeline.stream import latent_dataset

    stored = {s["key"]: s["prev"] for s in latent_dataset(context_latent_dir, split="train", split_nodes=False,
                                                           split_workers=False)}
    samples = list(samples_with_prev(context_latent_dir, "train", grayscale=True, urls_seed=3))
    assert sorted(s["key"] for s in samples) == sorted(stored)
    assert all(torch.equal(s["prev"], stored[s["key"]]) for s in samples)


def test_episodes_are_whole_and_in_order(latent_dir):
    episodes = read_episodes(latent_dir, "test", grayscale=True)
    for episode in episodes:
        assert episode.frames.shape == (episode.steps + 1, 1, 210, 160)
        assert [m["t"] for m in episode.metas] == list(range(episode.metas[0]["t"], episode.metas[0]["t"] + episode.steps))
        assert episode.actions.tolist() == [m["action"] for m in episode.metas]


# ------------------------------------------------------------------------------------ training
def test_training_lowers_the_loss_to_about_the_majority_code(latent_dir, tmp_path):
    config = control_train.ControllerTrainConfig(latent=latent_dir, out=tmp_path / "controller", steps=60,
                                                 batch_size=8, shuffle_buffer=16, lr=3e-3, log_every=10,
                                                 eval_split="train", channels=(8, 8, 16, 16, 16), hidden=32,
                                                 threads=1)
    metrics = control_train.train(config, progress=lambda line: None)
    losses = [row["loss"] for row in metrics["training"]["loss"]]
    assert losses[-1] < 0.5 * losses[0]
    scores = metrics["train"]
    # The tiny LAM's codes hardly depend on the frame or the action, so a few dozen steps bring the
    # controller to about the majority guess, not beyond it (the demo's report measures real skill).
    assert scores["accuracy"] >= scores["majority_accuracy"] - 0.03
    assert 0 < scores["changed_fraction"] < 1 and scores["frequency_loss"] > 0
    saved = torch.load(config.out / "controller.pt", weights_only=True)
    assert saved["step"] == 60 and saved["lam"]["sha256"] and saved["metrics"]["train"]["accuracy"] == scores["accuracy"]
    # the grids it may answer with: exactly the distinct grids of the training stream (60 x 8 samples
    # go round the few train pairs several times, so every train grid was seen)
    from pipeline.stream import latent_dataset
    train_grids = {tuple(s["codes"].flatten().tolist()) for s in latent_dataset(latent_dir, split="train")}
    assert {tuple(g) for g in saved["model"]["seen_grids"].tolist()} == train_grids
    assert metrics["training"]["grids_seen"] == len(train_grids) == len(saved["model"]["seen_grids"])


def test_cli_writes_report_and_refuses_bad_input(latent_dir, tmp_path, capsys):
    out = tmp_path / "cli"
    assert control_train.main(["--latent", str(latent_dir), "--out", str(out), "--steps", "3", "--batch-size", "4",
                               "--shuffle-buffer", "8", "--channels", "4", "4", "4", "4", "4", "--hidden", "8",
                               "--eval-batch-size", "16"]) == 0
    assert "per-cell accuracy" in capsys.readouterr().out
    assert {"controller.pt", "metrics.json", "report.md"} <= {p.name for p in out.iterdir()}
    assert "most common code per cell" in (out / "report.md").read_text()
    assert control_train.main(["--latent", str(tmp_path / "nowhere")]) == 2
    assert control_train.main(["--latent", str(latent_dir), "--steps", "0"]) == 2
    assert control_train.main(["--latent", str(latent_dir), "--max-grids", "-1"]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 3 and all(line.startswith("error: ") for line in errors)


def test_the_controller_trains_in_the_precision_asked_and_says_which(latent_dir, tmp_path, capsys):
    """bf16 where it is native (auto), or as asked: the first line says which, and a bf16 run's weights
    are not an fp32 run's (the forward pass ran under autocast)."""
    from common.device import cpu_native_bf16

    args = ["--latent", str(latent_dir), "--steps", "3", "--batch-size", "4", "--shuffle-buffer", "8",
            "--channels", "4", "4", "4", "4", "4", "--hidden", "8", "--eval-batch-size", "16", "--threads", "1"]
    weights = {}
    for amp, expected in (("off", "fp32 (--amp off)"), ("bf16", "bf16 (--amp bf16)"),
                          ("auto", "bf16 (auto: this CPU has native bf16" if cpu_native_bf16() else "fp32 (auto: ")):
        assert control_train.main([*args, "--out", str(tmp_path / amp), "--amp", amp]) == 0
        assert f"controller: precision {expected}" in capsys.readouterr().out
        weights[amp] = torch.load(tmp_path / amp / "controller.pt", weights_only=True)["model"]
    floats = [name for name, value in weights["off"].items() if value.is_floating_point()]
    assert any(not torch.equal(weights["off"][name], weights["bf16"][name]) for name in floats)
    native = weights["bf16"] if cpu_native_bf16() else weights["off"]
    assert all(torch.equal(weights["auto"][name], native[name]) for name in floats)
    assert control_train.main([*args, "--out", str(tmp_path / "x"), "--amp", "fp16"]) == 2


def test_reuse_keeps_a_finished_controller_and_retrains_for_other_settings(latent_dir, tmp_path, capsys):
    """`make demo` run again: the finished controller of these settings and this LAM is kept as it is;
    another setting trains afresh."""
    out = tmp_path / "cli"
    args = ["--latent", str(latent_dir), "--out", str(out), "--steps", "3", "--batch-size", "4", "--shuffle-buffer",
            "8", "--channels", "4", "4", "4", "4", "4", "--hidden", "8", "--eval-batch-size", "16", "--reuse"]
    assert control_train.main(args) == 0
    written = (out / "controller.pt").read_bytes()
    capsys.readouterr()
    assert control_train.main(args) == 0
    assert "nothing to train" in capsys.readouterr().out and (out / "controller.pt").read_bytes() == written
    assert control_train.main([*args, "--seed", "1"]) == 0
    assert "per-cell accuracy" in capsys.readouterr().out and (out / "controller.pt").read_bytes() != written


def test_the_frame_cache_gives_the_same_batches_decoding_each_frame_once(latent_dir):
    """Training batches read through the decoded-frame cache are the plain stream's, bit for bit,
    over several epochs; each distinct frame is decoded once in all; a cache with no room decodes
    every frame each time it comes and still gives the same batches; so do the scoring batches."""
    import json

    from control.data import FrameCache, ordered_batches, training_batches
    from pipeline.shards import iter_samples

    manifest = json.loads((latent_dir / "manifest.json").read_text())
    shards = manifest["splits"]["train"]["shards"]
    distinct = {members[m] for shard in shards
                for _, members in iter_samples(latent_dir / shard["file"], latent_dir / shard["index"])
                for m in ("cur.png", "next.png")}
    samples = sum(shard["pairs"] for shard in shards)
    steps = 3 * samples // 8                                 # three epochs
    cache, no_room = FrameCache(grayscale=True), FrameCache(grayscale=True, budget_gb=0)
    streams = [training_batches(latent_dir, 8, grayscale=True, shuffle_buffer=16, seed=0, cache=c)
               for c in (None, cache, no_room)]
    for _ in range(steps):
        plain, *others = (next(stream) for stream in streams)
        for other in others:
            assert plain.keys() == other.keys()
            assert all(torch.equal(plain[k], other[k]) for k in plain)
            assert plain["cur"].dtype == torch.float32 and plain["cur"].shape[1:] == (1, 210, 160)
    assert cache.decoded == len(distinct) and len(cache.frames) == len(distinct)
    assert no_room.decoded > 2 * samples and not no_room.frames
    for plain, cached in zip(ordered_batches(latent_dir, "test", 16, grayscale=True),
                             ordered_batches(latent_dir, "test", 16, grayscale=True, cache=FrameCache(True)),
                             strict=True):
        assert all(torch.equal(plain[k], cached[k]) for k in plain)
