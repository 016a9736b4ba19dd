"""The world model that is played (control/world.py, control/world_train.py): it starts as the LAM's
decoder, its checkpoint round-trips and names the LAM and controller it belongs to, training
lowers its loss, rollouts and the play server play it, and a world model of another LAM or
controller is refused."""
from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch

import play
from control import Controller, ControllerConfig, Simulator, load_controller, save_controller
from control.data import read_episodes
from control.world import PADDLE_ROW, WORLD_FORMAT, WorldModel, load_world, save_world, stack_past
from control.world_data import windows
from control import world_train
from model import load_checkpoint
from pipeline.palette import read_palette
from pipeline.shards import LATENT_FORMAT, load_manifest


def small_controller() -> Controller:
    torch.manual_seed(0)
    controller = Controller(ControllerConfig(channels=(4, 8, 8, 8, 8), hidden=16, action_dim=8))
    return controller.eval()


@pytest.fixture(scope="module")
def lam(tiny_checkpoint):
    return load_checkpoint(tiny_checkpoint)


@pytest.fixture(scope="module")
def controller_path(tmp_path_factory, lam) -> Path:
    """An untrained small controller that says it was trained on the tiny LAM's codes."""
    path = tmp_path_factory.mktemp("controller") / "controller.pt"
    return save_controller(path, small_controller(), step=0, lam={"sha256": lam.sha256, "step": lam.step})


@pytest.fixture(scope="module")
def episodes(latent_dir):
    return read_episodes(latent_dir, "test", grayscale=True)


@pytest.fixture(scope="module")
def trained(latent_dir, tiny_checkpoint, controller_path, tmp_path_factory):
    """A world model trained a few steps on the tiny latents: (its folder, the metrics it wrote)."""
    out = tmp_path_factory.mktemp("world") / "world"
    code = world_train.main(["--latent", str(latent_dir), "--checkpoint", str(tiny_checkpoint),
                             "--controller", str(controller_path), "--out", str(out), "--steps", "16",
                             "--batch-size", "4", "--shuffle-buffer", "8", "--rollout-steps", "2",
                             "--rollout-from", "0.5", "--lr", "1e-3", "--val-batches", "2", "--key",
                             "--past-frames", "3", "--context-noise", "0.02", "--threads", "1", "--device", "cpu"])
    assert code == 0
    return out, json.loads((out / "metrics.json").read_text())


# ------------------------------------------------------------------------------------ the model
@pytest.mark.parametrize("past_frames, key", [(2, False), (3, True)])
def test_an_untrained_world_model_draws_what_the_lams_decoder_draws(lam, episodes, past_frames, key):
    frames, codes = episodes[0].frames, episodes[0].codes
    world = WorldModel.from_lam(lam, past_frames=past_frames, key=key).eval()
    with torch.no_grad():
        drawn = world(stack_past([frames[0:2], frames[1:3], frames[2:4]], past_frames), codes[2:4],
                      torch.tensor([1, 3]))
    torch.testing.assert_close(drawn, lam.decode(frames[2:4], codes[2:4]), rtol=0, atol=1e-5)


def test_a_context_lams_world_model_starts_as_its_decoder(context_checkpoint, episodes):
    context_lam = load_checkpoint(context_checkpoint)
    frames, codes = episodes[0].frames, episodes[0].codes
    world = WorldModel.from_lam(context_lam, past_frames=3).eval()
    with torch.no_grad():
        drawn = world(stack_past([frames[0:2], frames[1:3], frames[2:4]], 3), codes[2:4])
    torch.testing.assert_close(drawn, context_lam.decode(frames[2:4], codes[2:4], frames[1:3]), rtol=0, atol=1e-5)


def test_the_checkpoint_round_trips_and_names_its_lam_and_controller(lam, episodes, tmp_path):
    world = WorldModel.from_lam(lam, past_frames=3, key=True).eval()
    with torch.no_grad():
        world.key.weight.normal_()                   # not the zeros it starts with
    owners = {"lam": {"sha256": lam.sha256, "step": lam.step}, "controller": {"sha256": "c" * 64, "step": 7}}
    path = save_world(tmp_path / "world.pt", world, step=5, **owners)
    assert [p.name for p in tmp_path.iterdir()] == ["world.pt"]          # no temp file left beside it
    raw = torch.load(io.BytesIO(path.read_bytes()), weights_only=True)
    assert raw["format"] == WORLD_FORMAT and raw["lam"] == owners["lam"] and raw["controller"] == owners["controller"]
    loaded = load_world(path)
    assert (loaded.step, loaded.lam, loaded.controller, loaded.past_frames) == (5, owners["lam"], owners["controller"], 3)
    frames, codes, keys = episodes[0].frames, episodes[0].codes, torch.tensor([0, 2])
    past = stack_past([frames[0:2], frames[1:3], frames[2:4]], 3)
    with torch.no_grad():
        torch.testing.assert_close(loaded(past, codes[2:4], keys), world(past, codes[2:4], keys), rtol=0, atol=0)


def test_a_damaged_checkpoint_is_one_clear_error(tmp_path):
    bad = tmp_path / "world.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(Exception, match="world.pt"):
        load_world(bad)


# ------------------------------------------------------------------------------------ data
def test_windows_are_consecutive_recorded_frames_with_the_past_repeated_at_an_episode_start(latent_dir, episodes):
    recorded = {e.name: e for e in episodes}
    seen = 0
    for window in windows(latent_dir, "test", past=3, steps=2, grayscale=True, urls_seed=None):
        frames = torch.stack(window["frames"])
        matches = [(name, t) for name, e in recorded.items() for t in range(e.steps - 1)
                   if torch.equal(e.frames[t], frames[2]) and torch.equal(e.frames[t + 2], frames[4])]
        assert matches, "a window that is not a run of the recording"
        name, t = matches[0]
        e = recorded[name]
        assert torch.equal(frames[1], e.frames[max(t - 1, 0)]) and torch.equal(frames[0], e.frames[max(t - 2, 0)])
        assert torch.equal(frames[3], e.frames[t + 1])
        assert window["actions"] == e.actions[t:t + 2].tolist()
        assert torch.equal(window["codes"], e.codes[t:t + 2])
        seen += 1
    assert seen > 0


# ------------------------------------------------------------------------------------ training
def test_training_lowers_the_loss_and_writes_a_checkpoint_naming_its_owners(trained, lam, controller_path):
    out, metrics = trained
    before, after = metrics["val"]["before"], metrics["val"]["after"]
    assert len(after["loss_per_step"]) == 2
    assert after["loss"] < before["loss"]
    world = load_world(out / "world.pt")
    assert world.lam["sha256"] == lam.sha256
    assert world.controller["sha256"] == load_controller(controller_path).sha256
    assert world.past_frames == 3 and world.config.key


def test_reuse_keeps_a_finished_world_model_of_the_same_settings_and_retrains_otherwise(
        latent_dir, tiny_checkpoint, controller_path, tmp_path, capsys):
    """`make demo` run again: --reuse keeps what finished with these settings, LAM and controller."""
    out = tmp_path / "world"
    args = ["--latent", str(latent_dir), "--checkpoint", str(tiny_checkpoint), "--controller", str(controller_path),
            "--out", str(out), "--steps", "2", "--batch-size", "2", "--shuffle-buffer", "4", "--val-batches", "0",
            "--threads", "1", "--device", "cpu", "--reuse"]
    assert world_train.main(args) == 0
    written = (out / "world.pt").read_bytes()
    capsys.readouterr()
    assert world_train.main(args) == 0
    assert "nothing to train" in capsys.readouterr().out
    assert (out / "world.pt").read_bytes() == written
    assert world_train.main([*args, "--lr", "1e-3"]) == 0          # another setting: trained again
    assert "nothing to train" not in capsys.readouterr().out
    assert load_world(out / "world.pt").step == 2


def test_the_paddle_row_codes_are_the_recordings_and_the_rest_the_controllers(lam, controller_path, episodes):
    e, controller = episodes[0], load_controller(controller_path)
    cur, prev, key = e.frames[2:4], e.frames[1:3], e.actions[2:4]
    chosen = controller.codes(cur, key, prev)
    recorded = (chosen + 1) % 256                             # differs from the controller's in every cell
    mixed = world_train.codes_for("paddle-row", controller, cur, prev, key, recorded, None)
    assert torch.equal(mixed[:, PADDLE_ROW], recorded[:, PADDLE_ROW])
    assert torch.equal(mixed[:, :PADDLE_ROW], chosen[:, :PADDLE_ROW])
    assert torch.equal(world_train.codes_for("controller", controller, cur, prev, key, recorded, None), chosen)
    assert torch.equal(world_train.codes_for("recorded", controller, cur, prev, key, recorded, None), recorded)


def test_a_controller_of_another_lam_is_refused_for_training(latent_dir, tiny_checkpoint, tmp_path, capsys):
    other = save_controller(tmp_path / "other.pt", small_controller(), step=0, lam={"sha256": "0" * 64, "step": 1})
    code = world_train.main(["--latent", str(latent_dir), "--checkpoint", str(tiny_checkpoint),
                             "--controller", str(other), "--out", str(tmp_path / "world"), "--steps", "1"])
    err = capsys.readouterr().err
    assert code != 0 and err.startswith("error:") and "other.pt" in err and "make controller" in err
    assert len(err.strip().splitlines()) == 1


# ------------------------------------------------------------------------------------ play
def test_the_simulator_draws_with_the_world_model(lam, controller_path, episodes):
    """A world model that draws something the LAM's decoder never would: rollouts show it."""
    world = WorldModel.from_lam(lam).eval()
    with torch.no_grad():
        world.decoder.up_stack[-1][0].bias.fill_(5.0)             # every pixel white
    sim = Simulator(lam, load_controller(controller_path), world=world)
    frames = episodes[0].frames
    for frame in sim.rollout(frames[1:3], frames[0:2], torch.tensor([[1, 2, 3], [0, 1, 1]])):
        assert torch.all(frame == 1)
    plain = Simulator(lam, load_controller(controller_path))
    assert not torch.all(next(plain.rollout(frames[1:3], frames[0:2], torch.tensor([[1], [0]]))) == 1)


def test_rollout_and_serve_play_the_trained_world_model(trained, tiny_checkpoint, controller_path, latent_dir,
                                                       tmp_path, capsys):
    out, _ = trained
    world_path = out / "world.pt"
    code = play.main(["rollout", "--checkpoint", str(tiny_checkpoint), "--controller", str(controller_path),
                      "--latent", str(latent_dir), "--world", str(world_path), "--out", str(tmp_path / "play"),
                      "--horizon", "3", "--starts", "2", "--gifs", "1", "--control-starts", "2",
                      "--control-steps", "2", "--threads", "1"])
    assert code == 0, capsys.readouterr().err
    metrics = json.loads((tmp_path / "play" / "metrics.json").read_text())
    assert metrics["world"] == str(world_path) and metrics["rollouts"]["starts"] == 2

    game, problem = play.build_game(play.ServeConfig(checkpoint=tiny_checkpoint, controller=controller_path,
                                                     latent=latent_dir, world=world_path, seed=0))
    assert problem is None and game.sim.world is not None and game.sim.world.past_frames == 3
    before, start = game.prev, game.cur
    game.step("LEFT")
    cur, prev = game.cur, game.prev
    answer = game.step("RIGHT")
    assert answer["step"] == 2
    choice = game.sim.codes(cur, prev, torch.tensor([2]))
    # the second step sees t-2 too: the start's frame t-1
    torch.testing.assert_close(game.cur, game.sim.draw(cur, choice, start, [before]), rtol=0, atol=0)
    palette = read_palette(load_manifest(latent_dir, LATENT_FORMAT)).levels(1)
    assert torch.isin(game.cur, palette.view(-1)).all()           # snapped, as every played frame


def test_a_world_model_of_another_lam_or_controller_is_refused_in_play(trained, tiny_checkpoint, latent_dir,
                                                                     tmp_path, capsys):
    out, _ = trained
    other = save_controller(tmp_path / "other.pt", small_controller(), step=3)
    code = play.main(["rollout", "--checkpoint", str(tiny_checkpoint), "--controller", str(other),
                      "--latent", str(latent_dir), "--world", str(out / "world.pt"), "--out", str(tmp_path / "p")])
    err = capsys.readouterr().err
    assert code != 0 and err.startswith("error:") and "world.pt" in err and "controller" in err
    assert len(err.strip().splitlines()) == 1
    world = load_world(out / "world.pt")
    world.lam = {"sha256": "f" * 64, "step": 1}
    stranger = save_world(tmp_path / "stranger.pt", world, step=1, lam=world.lam, controller=world.controller)
    game, problem = play.build_game(play.ServeConfig(checkpoint=tiny_checkpoint, controller=other,
                                                     latent=latent_dir, world=stranger))
    assert game is None and "stranger.pt" in problem and "LAM" in problem


def test_a_session_without_a_browser_plays_the_world_model(trained, tiny_checkpoint, controller_path, latent_dir,
                                                           tmp_path, capsys):
    out, _ = trained
    code = play.main(["session", "--checkpoint", str(tiny_checkpoint), "--controller", str(controller_path),
                      "--latent", str(latent_dir), "--world", str(out / "world.pt"), "--out", str(tmp_path),
                      "--steps", "6", "--no-browser", "--threads", "1"])
    assert code == 0, capsys.readouterr().err
    session = json.loads((tmp_path / "session.json").read_text())
    assert session["world"] == str(out / "world.pt") and session["browser"] is False
    assert session["score"]["steps"] == 6 and len(session["frames"]) == 7
