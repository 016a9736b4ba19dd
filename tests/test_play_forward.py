"""Playing the model forward: the game's palette (recorded by pack, carried by extraction, snapped to
in play), a model with a per-frame action code (Genie's split) from training to extraction to its
controller, and the controller's view of the codes of the step before."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import extract
import train
from common.errors import UserError
from control.data import NONE, samples_with_prev
from control.network import Controller, ControllerConfig
from control.rollout import codes_before
from pipeline.palette import Palette, frame_levels, read_palette, snap
from pipeline.stream import latent_dataset
from test_stream import first_test_shard, npy, rewrite_latent_shard


# ------------------------------------------------------------------------------------ palette
def test_pack_records_the_colours_of_the_recordings(pair_shards, videos):
    palette = read_palette(json.loads((pair_shards / "manifest.json").read_text()))
    frames = [np.asarray(Image.open(path).convert("RGB")) for path in sorted(videos.glob("*/*.png"))[::5]]
    seen = Palette.of_frames(frames)
    assert palette is not None and 2 <= len(palette.rgb) <= 16
    assert {tuple(c) for c in seen.rgb} <= {tuple(c) for c in palette.rgb}      # a sample finds them all
    assert (0, 0, 0) in {tuple(c) for c in palette.rgb}


def test_snapping_takes_each_pixel_to_the_nearest_colour():
    levels = torch.tensor([[0.0], [0.5], [0.9]])
    frames = torch.tensor([0.1, 0.26, 0.3, 0.7, 0.71, 1.0]).view(1, 1, 1, 6)
    assert snap(frames, levels).flatten().tolist() == pytest.approx([0.0, 0.5, 0.5, 0.5, 0.9, 0.9])
    rgb = Palette(np.array([[0, 0, 0], [200, 72, 72]], dtype=np.uint8))
    frame = torch.tensor([[0.7], [0.3], [0.3]]).view(1, 3, 1, 1)             # reddish
    assert snap(frame, rgb.levels(3)).flatten().tolist() == pytest.approx([200 / 255, 72 / 255, 72 / 255])
    assert rgb.levels(1).shape == (2, 1)                                       # gray: one level per luma


def test_frames_give_their_own_levels_and_a_manifest_without_a_palette_gives_none():
    frames = torch.tensor([0, 85, 142, 85]).float().div(255).view(1, 1, 2, 2)
    assert frame_levels(frames).flatten().tolist() == pytest.approx([0, 85 / 255, 142 / 255])
    assert frame_levels(torch.rand(1, 1, 20, 20)) is None                     # no palette game
    assert read_palette({"format": "lam-pairs/1"}) is None


# ------------------------------------------------------------------------------------ Genie's split
@pytest.fixture(scope="module")
def split_latent(pair_shards, tmp_path_factory):
    root = tmp_path_factory.mktemp("split")
    assert train.main(["--shards", str(pair_shards), "--preset", "tiny", "--model", "split", "--out", str(root / "ckpt"),
                       "--run-dir", str(root / "run"), "--iters", "4", "--no-compile", "--wandb", "disabled",
                       "--set", "ckpt_every=4"]) == 0
    checkpoint = root / "ckpt" / "step-000004.pt"
    assert extract.main(["--shards", str(pair_shards), "--checkpoint", str(checkpoint), "--out", str(root / "latent"),
                         "--backend", "torch", "--no-progress"]) == 0
    return checkpoint, root / "latent"


def test_extraction_stores_a_split_models_action_code(split_latent, pair_shards):
    from model import load_checkpoint

    checkpoint, latent = split_latent
    manifest = json.loads((latent / "manifest.json").read_text())
    assert manifest["checkpoint"]["action_codes"] == 8 and manifest["action_dtype"] == "uint8"
    assert manifest["palette"] == json.loads((pair_shards / "manifest.json").read_text())["palette"]
    lam = load_checkpoint(checkpoint)
    samples = list(latent_dataset(latent, split="val", split_nodes=False, split_workers=False))
    cur, nxt, prev = (torch.stack([s[k] for s in samples]) for k in ("cur", "next", "prev"))
    grid, action = lam.encode_both(cur, nxt, prev)
    assert [s["action_code"] for s in samples] == action.tolist()
    assert torch.equal(torch.stack([s["codes"] for s in samples]), grid)


def test_a_split_models_controller_predicts_the_action_code(split_latent, tmp_path):
    from control import Simulator, load_controller
    from control.train import main as train_controller
    from model import load_checkpoint

    checkpoint, latent = split_latent
    assert train_controller(["--latent", str(latent), "--out", str(tmp_path), "--steps", "2", "--batch-size", "4",
                             "--shuffle-buffer", "8", "--eval-split", "val", "--channels", "4", "4", "4", "4", "4",
                             "--hidden", "8"]) == 0
    controller = load_controller(tmp_path / "controller.pt")
    assert controller.config.target == "action" and controller.config.codebook_size == 8
    sim = Simulator(load_checkpoint(checkpoint), controller)
    frames = torch.rand(2, 1, 210, 160)
    choice = sim.codes(frames, frames, torch.tensor([2, 3]))
    assert choice.grid is None and choice.action.shape == (2,)                 # played from the action code alone
    assert sim.draw(frames, choice, frames).shape == frames.shape


# ------------------------------------------------------------------------------------ codes of the step before
def test_training_samples_carry_the_codes_of_the_transition_before(latent_dir):
    samples = list(samples_with_prev(latent_dir, "val", True, urls_seed=None))
    by_key = {(s["meta"]["episode"], s["meta"]["t"]): s for s in samples}
    checked = 0
    for (episode, t), sample in by_key.items():
        before = by_key.get((episode, t - 1))
        if before is not None and sample["key"] != samples[0]["key"]:
            assert torch.equal(sample["prev_codes"], before["codes"])
            checked += 1
        elif t == 0:
            assert (sample["prev_codes"] == NONE).all()
    assert checked > 10


def test_the_controller_reads_the_codes_before_and_none_is_its_own_token():
    torch.manual_seed(0)
    controller = Controller(ControllerConfig(channels=(4, 4, 4, 4, 4), hidden=8, prev_codes=True)).eval()
    torch.nn.init.normal_(controller.code_embedding.weight)
    frames, action = torch.rand(1, 1, 210, 160), torch.tensor([2])
    codes = torch.randint(0, 256, (1, 7, 5))
    with torch.no_grad():
        seen, unseen = controller(frames, action, frames, codes), controller(frames, action, frames)
        assert not torch.allclose(seen, unseen)
        assert torch.equal(unseen, controller(frames, action, frames, torch.full((1, 7, 5), NONE)))
    old = ControllerConfig.from_dict({k: v for k, v in ControllerConfig().to_dict().items() if k != "prev_codes"})
    assert old.prev_codes is False and Controller(old).code_embedding is None   # checkpoints from before


def test_a_rollout_starts_from_the_recorded_codes_before_it(latent_dir):
    from control.data import read_episodes

    episode = read_episodes(latent_dir, "test", grayscale=True)[0]
    assert (codes_before(episode, 0).grid == NONE).all()
    assert torch.equal(codes_before(episode, 3).grid[0], episode.codes[2])


# ------------------------------------------------------------------------------------ own frames
@pytest.mark.parametrize("channels", [1, 3])
def test_snapping_equals_the_nearest_level_by_brute_force_in_any_level_order(channels):
    generator = torch.Generator().manual_seed(channels)
    levels = torch.rand(7, channels, generator=generator)                   # unsorted, as a manifest may list them
    frames = torch.rand(2, channels, 21, 16, generator=generator)
    distance = (frames.unsqueeze(1) - levels.view(1, 7, channels, 1, 1)).pow(2).sum(2)
    assert torch.equal(snap(frames, levels), levels[distance.argmin(1)].permute(0, 3, 1, 2))


def test_own_frames_replace_a_share_of_frame_t_by_the_models_snapped_drawing():
    from model import LatentActionModel, ModelConfig
    from training.own_frames import OwnFrames

    torch.manual_seed(0)
    model = LatentActionModel(ModelConfig(width=0.0625, code_dim=32)).train()
    levels = torch.tensor([[0.0], [0.5], [1.0]])
    cur, prev = torch.rand(8, 1, 210, 160), torch.rand(8, 1, 210, 160)
    own = OwnFrames(share=0.5, start=3, seed=0, levels=levels)
    assert own(model, {"cur": cur, "prev": prev}, step=2) is None               # not before its start
    assert own(model, {"cur": cur}, step=5) is None                              # needs frame t-1
    start = own(model, {"cur": cur, "prev": prev}, step=5)
    again = own(model, {"cur": cur, "prev": prev}, step=5)
    assert torch.equal(start, again) and model.training                        # repeatable; training mode kept
    replaced = [i for i in range(8) if not torch.equal(start[i], cur[i])]
    assert 0 < len(replaced) < 8
    model.eval()
    drawn = snap(model.decode(prev, model.encode(prev, cur, prev), prev).clamp(0, 1), levels)
    for i in replaced:
        torch.testing.assert_close(start[i], drawn[i])
    # the decoder starts from it, the encoder still sees the recorded pair
    model.train()
    out = model(cur, cur, prev, start=start)
    assert out["pred"].shape == cur.shape


# ------------------------------------------------------------------------------------ action codes in range
def split_latent_copy(split_latent, tmp_path) -> Path:
    latent = tmp_path / "latent"
    shutil.copytree(split_latent[1], latent)
    return latent


@pytest.mark.parametrize("stored, problem", [
    (np.array([302.9]), r"action\.npy holds float64, expected uint8"),
    (np.array([9], dtype=np.uint8), r"action\.npy holds code 9, but there are 8 codes \(0\.\.7\)"),
    (np.array([-1], dtype=np.int64), r"action\.npy holds int64, expected uint8"),
])
def test_an_action_code_of_another_type_or_past_its_count_names_the_sample(split_latent, tmp_path, stored, problem):
    """A float64 action.npy of 302.9 was read as code 302 of 8; control.train then crashed on it."""
    from control.data import read_episodes
    from control.train import main as train_controller

    latent = split_latent_copy(split_latent, tmp_path)
    shard = first_test_shard(latent)
    first_key = rewrite_latent_shard(latent, shard, lambda members: members.update({"action.npy": npy(stored)}))[0]
    with pytest.raises(UserError, match=rf"^{latent / shard}: sample {first_key}: {problem}$"):
        read_episodes(latent, "test", grayscale=True)
    train_shard = json.loads((latent / "manifest.json").read_text())["splits"]["train"]["shards"][0]["file"]
    rewrite_latent_shard(latent, train_shard, lambda members: members.update({"action.npy": npy(stored)}))
    assert train_controller(["--latent", str(latent), "--out", str(tmp_path / "controller"), "--steps", "2",
                             "--batch-size", "4", "--shuffle-buffer", "8", "--channels", "4", "4", "4", "4", "4",
                             "--hidden", "8"]) == 2


def test_a_split_models_sample_without_its_action_code_is_named(split_latent, tmp_path):
    """One sample without action.npy: read with its manifest, the stream names it; read as loose
    shards (no manifest to say what to expect), read_episodes names it (it was KeyError 'action_code')."""
    from control.data import read_episodes

    latent = split_latent_copy(split_latent, tmp_path)
    shard = first_test_shard(latent)
    dropped = []

    def drop_the_third(members: dict) -> None:
        dropped.append(None)
        if len(dropped) == 3:
            members.pop("action.npy")

    missing_key = rewrite_latent_shard(latent, shard, drop_the_third)[2]
    with pytest.raises(UserError, match=rf"^{latent / shard}: sample {missing_key}: no action\.npy, but "
                                        rf"{latent / 'manifest.json'} names a LAM with a per-frame action code"):
        read_episodes(latent, "test", grayscale=True)
    loose = tmp_path / "loose" / "test"
    loose.mkdir(parents=True)
    shutil.copy(latent / shard, loose / "latent-000000.tar")
    shutil.copy((latent / shard).with_suffix(".idx"), loose / "latent-000000.idx")
    with pytest.raises(UserError, match=rf"sample {missing_key} has no action\.npy, but sample \S+ has one"):
        read_episodes([str(loose / "latent-000000.tar")], "test", grayscale=True)


def test_a_controller_of_another_kind_of_lam_is_refused_both_ways(split_latent, tiny_checkpoint, latent_dir,
                                                                  tmp_path, capsys):
    """A controller trained for a split LAM (it predicts the action code) played with a grid LAM was
    a warning and a full report; a grid controller played with a split LAM a RuntimeError
    traceback. Both are one line, whatever --allow-other-checkpoint says: they cannot work."""
    import play
    from control import save_controller
    from control.train import main as train_controller

    split_checkpoint, split_latents = split_latent
    assert train_controller(["--latent", str(split_latents), "--out", str(tmp_path / "split"), "--steps", "2",
                             "--batch-size", "4", "--shuffle-buffer", "8", "--eval-split", "val", "--channels",
                             "4", "4", "4", "4", "4", "--hidden", "8"]) == 0
    grid_controller = save_controller(tmp_path / "grid.pt", Controller(ControllerConfig(
        channels=(4, 4, 4, 4, 4), hidden=8)).eval(), step=0)
    for checkpoint, controller, latent, lam_has in (
            (tiny_checkpoint, tmp_path / "split" / "controller.pt", latent_dir, "action_codes 0"),
            (split_checkpoint, grid_controller, split_latents, "action_codes 8")):
        capsys.readouterr()
        argv = ["rollout", "--checkpoint", str(checkpoint), "--controller", str(controller), "--latent", str(latent),
                "--out", str(tmp_path / "play"), "--horizon", "2", "--starts", "2", "--gifs", "0",
                "--control-starts", "2", "--control-steps", "2", "--allow-other-checkpoint"]
        assert play.main(argv) == 2
        captured = capsys.readouterr()
        lines = captured.err.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in captured.err, captured.err
        assert lines[0].startswith(f"error: {controller}: made for a model with") and lam_has in lines[0]
