"""The VQ-VAE: quantiser against brute force, gradients, resets, shapes, the public API."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from common.errors import UserError
from model import CHECKPOINT_FORMAT, LatentActionModel, ModelConfig, Quantizer, load_checkpoint
from model.config import VARIANTS, ShiftConfig, VQConfig

SMALL = ModelConfig.named("vq-shift", width=0.125, vq=VQConfig(reset_buffer=64))      # the vector quantiser's tests


def frames(batch: int, channels: int = 1, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    cur = torch.rand(batch, channels, 210, 160, generator=g)
    nxt = (cur + 0.1 * torch.rand(batch, channels, 210, 160, generator=g)).clamp(0, 1)
    return cur, nxt


def seeded_quantizer(k: int = 16, d: int = 8, seed: int = 0) -> Quantizer:
    torch.manual_seed(seed)
    q = Quantizer(VQConfig(codes=k, reset_buffer=32), d)
    q.codebook.data.normal_()
    q.initialised.fill_(True)
    q._seeded = True
    return q


def test_nearest_code_matches_brute_force_numpy():
    q = seeded_quantizer(k=32, d=8).eval()
    z = torch.randn(3, 8, 7, 5)
    quantised, codes, _ = q(z)
    flat = z.permute(0, 2, 3, 1).reshape(-1, 8).numpy().astype(np.float64)
    book = q.codebook.detach().numpy().astype(np.float64)
    brute = np.array([np.argmin([((v - e) ** 2).sum() for e in book]) for v in flat])
    assert codes.dtype == torch.int64 and codes.shape == (3, 7, 5)
    np.testing.assert_array_equal(codes.reshape(-1).numpy(), brute)
    np.testing.assert_allclose(quantised.permute(0, 2, 3, 1).reshape(-1, 8).detach().numpy(), book[brute],
                               rtol=0, atol=1e-6)


def test_straight_through_gradient_passes_unchanged():
    q = seeded_quantizer().eval()
    z = torch.randn(2, 8, 7, 5, requires_grad=True)
    quantised, _, _ = q(z)
    upstream = torch.randn_like(quantised)
    (quantised * upstream).sum().backward()
    torch.testing.assert_close(z.grad, upstream, rtol=0, atol=0)


def test_quantizer_losses_by_name_and_commitment_weight():
    q = seeded_quantizer().eval()
    z = torch.randn(2, 8, 7, 5)
    quantised, _, losses = q(z)
    assert set(losses) == {"commitment", "codebook", "entropy"}
    mse = torch.mean((z - quantised.detach()) ** 2)
    torch.testing.assert_close(losses["commitment"], 0.25 * mse)
    torch.testing.assert_close(losses["codebook"], mse)
    assert losses["entropy"] >= 0


def test_entropy_term_gradient_reaches_encoder_weights():
    torch.manual_seed(0)
    model = LatentActionModel(SMALL).train()
    cur, nxt = frames(4)
    out = model(cur, nxt)
    out["entropy"].backward()          # the entropy term alone: recon, commitment and codebook left out
    first_conv = model.encoder.stack[0][0].weight
    projection = model.encoder.project.weight
    assert first_conv.grad is not None and projection.grad is not None
    assert first_conv.grad.abs().max() > 1e-6 and projection.grad.abs().max() > 1e-6
    assert model.decoder.frame_stack[0][0].weight.grad is None      # the decoder is not involved


def test_first_training_batch_seeds_codebook_from_encoder_outputs():
    torch.manual_seed(0)
    model = LatentActionModel(SMALL).train()
    out = model(*frames(4))
    assert bool(model.quantizer.initialised)
    used = out["codes"].unique().numel()
    assert used > 20, f"seeded codebook should spread 140 vectors over many codes, used {used}"


def test_reset_replaces_only_unused_codes():
    q = seeded_quantizer(k=64, d=8).train()
    z = torch.randn(2, 8, 7, 5) * 0.1            # near the origin: a few codes win everything
    _, codes, _ = q(z)
    before = q.codebook.detach().clone()
    used = torch.zeros(64, dtype=torch.bool)
    used[codes.unique()] = True
    assert 0 < used.sum() < 64
    replaced = q.reset_dead_codes()
    after = q.codebook.detach()
    assert replaced == int((~used).sum())
    assert torch.equal(after[used], before[used])                  # bit-identical
    assert not torch.isclose(after[~used], before[~used]).all(dim=1).any()
    recent = q.recent[: int(q.recent_count)]
    for vector in after[~used]:                                    # each new code is a recent encoder output
        assert torch.isclose(recent, vector).all(dim=1).any()
    assert q.usage.sum() == 0


def test_reset_is_a_no_op_in_eval_mode():
    q = seeded_quantizer().train()
    q(torch.randn(1, 8, 7, 5) * 0.1)
    before = q.codebook.detach().clone()
    q.eval()
    assert q.reset_dead_codes() == 0
    assert torch.equal(q.codebook, before)


def test_usage_and_ring_buffer_update_only_in_training():
    q = seeded_quantizer().eval()
    q(torch.randn(2, 8, 7, 5))
    assert q.usage.sum() == 0 and int(q.recent_count) == 0
    q.train()
    q(torch.randn(2, 8, 7, 5))
    assert q.usage.sum() == 70 and int(q.recent_count) == 32      # ring buffer holds its capacity


def test_lookup_of_codes_equals_quantised():
    q = seeded_quantizer().eval()
    quantised, codes, _ = q(torch.randn(2, 8, 7, 5))
    torch.testing.assert_close(q.lookup(codes), quantised, rtol=0, atol=1e-6)


def test_decode_of_encode_equals_forward_in_eval_mode():
    torch.manual_seed(0)
    model = LatentActionModel(SMALL)
    model.train()(*frames(4, seed=1))             # seed the codebook and move BatchNorm statistics
    model.eval()
    cur, nxt = frames(3, seed=2)
    out = model(cur, nxt)
    codes = model.encode(cur, nxt)
    assert torch.equal(codes, out["codes"])
    torch.testing.assert_close(model.decode(cur, codes), out["pred"], rtol=0, atol=1e-6)


@pytest.mark.parametrize("channels", [1, 3])
def test_full_size_model_shapes_and_range(channels):
    torch.manual_seed(0)
    model = LatentActionModel(ModelConfig(in_channels=channels)).eval()
    assert model.config.channels == (64, 128, 256, 512, 512)
    assert model.codebook.shape == (256, 128)
    cur, nxt = frames(2, channels)
    with torch.no_grad():
        out = model(cur, nxt)
        latent = model.encoder(cur, nxt)
    assert latent.shape == (2, 128, 7, 5)
    assert out["pred"].shape == (2, channels, 210, 160)
    assert out["codes"].shape == (2, 7, 5) and out["codes"].dtype == torch.int64
    assert 0 <= out["codes"].min() and out["codes"].max() < 256
    assert 0 <= out["pred"].min() and out["pred"].max() <= 1


def test_grad_checkpoint_gives_same_gradients_and_batchnorm_stats():
    torch.manual_seed(0)
    plain = LatentActionModel(SMALL).train()
    checkpointed = copy.deepcopy(plain)
    checkpointed.set_grad_checkpoint(True)
    cur, nxt = frames(2)
    for model in (plain, checkpointed):
        torch.manual_seed(1)
        model(cur, nxt)["loss"].backward()
    for (name, a), b in zip(plain.named_parameters(), checkpointed.parameters()):
        torch.testing.assert_close(a.grad, b.grad, msg=name)
    for (name, a), b in zip(plain.named_buffers(), checkpointed.buffers()):
        torch.testing.assert_close(a, b, msg=name)


def test_model_config_validates():
    with pytest.raises(ValueError, match="in_channels"):
        ModelConfig(in_channels=2)
    with pytest.raises(ValueError, match="entropy_temperature"):
        VQConfig(entropy_temperature=0)
    assert ModelConfig.from_dict(ModelConfig(width=0.5).to_dict()) == ModelConfig(width=0.5)


def test_load_checkpoint_round_trip_and_errors(tmp_path):
    torch.manual_seed(0)
    model = LatentActionModel(SMALL)
    model.train()(*frames(2))
    path = tmp_path / "ok.pt"
    torch.save({"format": CHECKPOINT_FORMAT, "model": model.state_dict(),
                "config": {"model": SMALL.to_dict(), "train": {}}, "step": 7}, path)
    lam = load_checkpoint(path, "cpu")
    assert not lam.training and lam.step == 7 and lam.config == SMALL
    cur, nxt = frames(2, seed=3)
    model.eval()
    assert torch.equal(lam.encode(cur, nxt), model.encode(cur, nxt))

    with pytest.raises(UserError, match="not found"):
        load_checkpoint(tmp_path / "missing.pt")
    (tmp_path / "corrupt.pt").write_bytes(path.read_bytes()[:1000])
    with pytest.raises(UserError, match="not a readable checkpoint"):
        load_checkpoint(tmp_path / "corrupt.pt")
    torch.save({"format": "something-else/1"}, tmp_path / "foreign.pt")
    with pytest.raises(UserError, match="format is 'something-else/1'"):
        load_checkpoint(tmp_path / "foreign.pt")


@pytest.mark.parametrize("options", [
    dict(encoder_input="pair_difference"), dict(encoder_input="pair"), dict(decoder_skips=False),
    dict(latent_every_stage=False), dict(output="residual", shift=None), dict(output="sigmoid", shift=None),
    dict(changed_pixel_weight=1.0)])
def test_model_options_keep_the_api(options):
    torch.manual_seed(0)
    model = LatentActionModel(ModelConfig(width=0.125, **options))
    model.train()(*frames(4, seed=1))["loss"].backward()
    model.eval()
    cur, nxt = frames(3, seed=2)
    out = model(cur, nxt)
    codes = model.encode(cur, nxt)
    assert torch.equal(codes, out["codes"]) and out["pred"].shape == (3, 1, 210, 160)
    assert 0 <= out["pred"].min() and out["pred"].max() <= 1
    torch.testing.assert_close(model.decode(cur, codes), out["pred"], rtol=0, atol=1e-6)


def test_residual_output_starts_as_a_copy_of_frame_t():
    model = LatentActionModel(ModelConfig.named("vq-residual", width=0.125, vq=VQConfig(reset_buffer=64))).eval()
    cur, nxt = frames(2)
    assert torch.equal(model(cur, nxt)["pred"], cur)


def test_a_flat_config_from_before_the_variants_rebuilds_its_model():
    """A checkpoint saved before the variants has a flat config; fields it lacks predate them, so
    it rebuilds the seed's model its weights belong to, not today's defaults."""
    old = ModelConfig.from_dict({"width": 0.125})
    assert old == ModelConfig.named("seed", width=0.125, variant="legacy")
    assert {k: v.shape for k, v in LatentActionModel(old).state_dict().items()} == \
        {k: v.shape for k, v in LatentActionModel(ModelConfig.named("seed", width=0.125)).state_dict().items()}
    flat_default = {"width": 0.125, "codebook_size": 256, "quantizer": "fsq", "fsq_levels": "8,8,4",
                    "encoder_input": "difference", "decoder_skips": True, "latent_every_stage": True,
                    "residual_output": True, "changed_pixel_weight": 10.0, "motion": "shift", "motion_codes": True,
                    "commitment_weight": 0.25, "reset_buffer": 4096, "reset_every": 200}
    assert ModelConfig.from_dict(flat_default) == ModelConfig.named("fsq-shift", width=0.125, variant="legacy")


def test_changed_pixel_weight_weights_only_changed_pixels():
    model = LatentActionModel(ModelConfig(width=0.125, changed_pixel_weight=5.0))
    cur = torch.zeros(1, 1, 210, 160)
    nxt = cur.clone()
    nxt[..., 0, 0] = 1.0
    pred = torch.full_like(cur, 0.5)
    expected = ((pred - nxt).pow(2) * torch.where(nxt != cur, 5.0, 1.0)).mean()
    torch.testing.assert_close(model.reconstruction_loss(pred, cur, nxt), expected)


def test_model_option_values_are_validated():
    with pytest.raises(ValueError, match="encoder_input"):
        ModelConfig(encoder_input="t_only")
    with pytest.raises(ValueError, match="changed_pixel_weight"):
        ModelConfig(changed_pixel_weight=0.5)


# ------------------------------------------------------------------------ frame t-1 (context=1)
def context_model(**options) -> LatentActionModel:
    torch.manual_seed(0)
    model = LatentActionModel(ModelConfig(width=0.125, context=1, **options))
    cur, nxt = frames(4, seed=1)
    model.train()(cur, nxt, prev=frames(4, seed=5)[0])["loss"].backward()     # seed codebook, move BatchNorm
    return model.eval()


@pytest.mark.parametrize("encoder_input, encoder_frames", [("difference", 2), ("pair", 3), ("pair_difference", 3)])
def test_context_model_sees_frame_t_minus_1(encoder_input, encoder_frames):
    """The encoder gets the previous change (C more channels), the decoder's frame stack
    concat(t, t - (t-1)); both change with prev."""
    model = context_model(encoder_input=encoder_input)
    assert model.encoder.stack[0][0].weight.shape[1] == encoder_frames
    assert model.decoder.frame_stack[0][0].weight.shape[1] == 2
    cur, nxt = frames(3, seed=2)
    prev, other = frames(3, seed=3)[0], frames(3, seed=4)[0]
    with torch.no_grad():
        assert not torch.allclose(model.encoder(cur, nxt, prev), model.encoder(cur, nxt, other))
        latent = model.quantizer.lookup(model.encode(cur, nxt, prev))
        assert not torch.allclose(model.decoder.frame_stack(model.decoder.frame_input(cur, prev)),
                                  model.decoder.frame_stack(model.decoder.frame_input(cur, other)))
        assert model.decoder(cur, latent, prev).shape == cur.shape


@pytest.mark.parametrize("encoder_input", ["difference", "pair", "pair_difference"])
def test_context_model_keeps_the_api(encoder_input):
    model = context_model(encoder_input=encoder_input)
    cur, nxt = frames(3, seed=2)
    prev = frames(3, seed=3)[0]
    out = model(cur, nxt, prev)
    codes = model.encode(cur, nxt, prev)
    assert torch.equal(codes, out["codes"]) and out["pred"].shape == (3, 1, 210, 160)
    torch.testing.assert_close(model.decode(cur, codes, prev), out["pred"], rtol=0, atol=1e-6)
    # given no prev, a context model takes frame t (as the loader does at an episode's first pair)
    assert torch.equal(model.encode(cur, nxt), model.encode(cur, nxt, cur))
    assert torch.equal(model.decode(cur, codes), model.decode(cur, codes, cur))
    assert torch.equal(model(cur, nxt)["pred"], model(cur, nxt, cur)["pred"])


def test_model_without_context_ignores_prev():
    torch.manual_seed(0)
    model = LatentActionModel(SMALL)
    model.train()(*frames(4, seed=1))
    model.eval()
    cur, nxt = frames(3, seed=2)
    prev = frames(3, seed=3)[0]
    codes = model.encode(cur, nxt)
    assert torch.equal(model.encode(cur, nxt, prev), codes)
    assert torch.equal(model.decode(cur, codes, prev), model.decode(cur, codes))


@pytest.mark.parametrize("context", [0, 1])
@pytest.mark.parametrize("call", ["encode", "decode", "forward"])
def test_prev_of_the_wrong_shape_is_refused(context, call):
    model = LatentActionModel(ModelConfig(width=0.125, context=context)).eval()
    cur, nxt = frames(2)
    codes = torch.zeros(2, 7, 5, dtype=torch.int64)
    wrong = torch.rand(2, 3, 210, 160)
    run = {"encode": lambda: model.encode(cur, nxt, wrong), "decode": lambda: model.decode(cur, codes, wrong),
           "forward": lambda: model(cur, nxt, wrong)}[call]
    with pytest.raises(ValueError, match=r"prev has shape \(2, 3, 210, 160\), but cur has \(2, 1, 210, 160\)"):
        run()


def test_checkpoints_whose_model_config_holds_training_settings_still_load(tmp_path):
    """reset_every and grad_checkpoint were model fields once: a checkpoint that saved them there
    loads (they are dropped; its train config holds them too)."""
    saved = {"width": 0.125, "reset_every": 200, "grad_checkpoint": True}
    assert ModelConfig.from_dict(saved) == ModelConfig.named("seed", width=0.125, variant="legacy")
    model = LatentActionModel(ModelConfig.from_dict(saved))
    torch.save({"format": CHECKPOINT_FORMAT, "model": model.state_dict(), "config": {"model": saved, "train": {}},
                "step": 3}, tmp_path / "old.pt")
    assert load_checkpoint(tmp_path / "old.pt", "cpu").config == ModelConfig.from_dict(saved)


def test_context_is_validated_and_old_configs_load_as_context_0():
    for context in (2, -1):
        with pytest.raises(ValueError, match=f"context must be 0 .* or 1 .*, got {context}"):
            ModelConfig(context=context)
    assert ModelConfig.from_dict({"width": 0.125}).context == 0            # a flat config from before the field
    assert ModelConfig.from_dict(ModelConfig(width=0.125, context=1).to_dict()).context == 1


def test_configs_saved_before_shift_indexing_existed_load_as_the_gather_they_were():
    saved = ModelConfig(width=0.125, shift=ShiftConfig(indexed_by="source")).to_dict()
    assert ModelConfig.from_dict(saved).shift.indexed_by == "source"
    del saved["shift"]["indexed_by"]
    assert ModelConfig.from_dict(saved).shift.indexed_by == "destination"
    assert ModelConfig.from_dict({"width": 0.125, "motion": "shift"}).shift.indexed_by == "destination"


# ------------------------------------------------------------------------ named variants
@pytest.mark.parametrize("name", list(VARIANTS))
def test_every_variant_trains_a_step_and_round_trips_a_checkpoint(name, tmp_path):
    torch.manual_seed(0)
    config = ModelConfig.named(name, width=0.0625, code_dim=32)
    model = LatentActionModel(config)
    cur, nxt = frames(2, seed=1)
    prev = frames(2, seed=5)[0]
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()(cur, nxt, prev)["loss"].backward()
    optimizer.step()
    path = tmp_path / "ckpt.pt"
    torch.save({"format": CHECKPOINT_FORMAT, "model": model.state_dict(), "config": {"model": config.to_dict()},
                "step": 1}, path)
    lam = load_checkpoint(path, "cpu")
    assert lam.config == config and lam.config.variant == name
    model.eval()
    codes = lam.encode(cur, nxt, prev)
    assert torch.equal(codes, model.encode(cur, nxt, prev)) and 0 <= codes.min() and codes.max() < config.codebook_size
    action = lam.encode_action(cur, nxt, prev) if lam.action_codes else None
    torch.testing.assert_close(lam.decode(cur, codes, prev, action), model(cur, nxt, prev)["pred"], rtol=0, atol=1e-6)


def test_variants_differ_where_they_say():
    seed, default = ModelConfig.named("seed"), ModelConfig()
    assert (seed.output, seed.quantizer, seed.encoder_input, seed.changed_pixel_weight) == ("sigmoid", "vq", "pair", 1.0)
    assert seed.vq == VQConfig() and seed.fsq is None and seed.shift is None
    assert (seed.codebook_size, default.codebook_size) == (256, 256)
    assert ModelConfig.named("split").action_code.levels == (8,)
    with pytest.raises(ValueError, match="no model variant 'nope'"):
        ModelConfig.named("nope")


@pytest.mark.parametrize("options, message", [
    (dict(vq=VQConfig()), "vq: this model has no vq part"),
    (dict(output="sigmoid"), "shift: this model has no shift part"),
    (dict(output="warp", shift=None), "output must be one of sigmoid, residual, shift"),
])
def test_a_part_the_model_does_not_have_is_refused(options, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig(**options)


def test_split_model_is_played_from_the_action_code_alone():
    """A model with a per-frame action code decodes with no grid (the "no grid" latent), as it is
    played; in training a grid_dropout share of pairs get that latent too."""
    torch.manual_seed(0)
    model = LatentActionModel(ModelConfig.named("split", width=0.0625, code_dim=32)).eval()
    cur, nxt = frames(3, seed=1)
    action = model.encode_action(cur, nxt, cur)
    assert action.shape == (3,) and action.dtype == torch.int64 and 0 <= action.min() and action.max() < 8
    without = model.decode(cur, None, cur, action)
    assert without.shape == cur.shape
    grid = model.encode(cur, nxt, cur)
    latent = model.decoder_latent(None, model.action_quantizer.lookup(action.view(-1, 1, 1)))
    expected = model.no_grid.expand(3, -1, -1, -1) + model.action_quantizer.lookup(action.view(-1, 1, 1))
    torch.testing.assert_close(latent, expected)
    with pytest.raises(ValueError, match="needs the per-frame action code"):
        model.decode(cur, grid, cur)


@pytest.mark.parametrize("size", [(105, 80), (53, 40), (27, 20), (14, 10), (7, 5), (9, 7)])
def test_film_scales_each_cells_patch_as_nearest_upsampling_does(size):
    """FiLM broadcasts each cell's scale and shift over its patch without upsampling them: the same
    values as F.interpolate(mode="nearest") would give (exactly), and the same gradients (float64)."""
    import torch.nn.functional as F

    from model.networks import FiLM

    torch.manual_seed(0)
    film = FiLM(6, 4).double()
    torch.nn.init.normal_(film.to_scale_shift.weight)
    features = torch.randn(2, 4, *size, dtype=torch.float64).to(memory_format=torch.channels_last).requires_grad_()
    latent = torch.randn(2, 6, 7, 5, dtype=torch.float64, requires_grad=True)

    def upsampled(features, latent):
        gamma, beta = F.interpolate(film.to_scale_shift(latent), size=size, mode="nearest").chunk(2, dim=1)
        return features * (1 + gamma) + beta

    assert torch.equal(film(features, latent), upsampled(features, latent))
    weights = torch.randn(2, 4, *size, dtype=torch.float64)
    ours = torch.autograd.grad((film(features, latent) * weights).sum(), (features, latent))
    theirs = torch.autograd.grad((upsampled(features, latent) * weights).sum(), (features, latent))
    assert all(torch.allclose(a, b) for a, b in zip(ours, theirs))


def test_a_model_trains_after_it_ran_under_inference_mode_in_the_same_process():
    """Extraction and evaluation run under torch.inference_mode; what the model caches there (FiLM's
    upsampling layout) must not reach a later training step in the same process, where a tensor made
    in inference mode cannot be saved for backward (a test worker that extracted, then trained, hit it)."""
    model = LatentActionModel(ModelConfig(width=0.0625, code_dim=32))
    cur, nxt = frames(2)
    with torch.inference_mode():
        model.eval()
        model(cur, nxt)
    model.train()
    model(cur, nxt)["loss"].backward()
    assert all(p.grad is not None for p in model.decoder.parameters() if p.requires_grad)
