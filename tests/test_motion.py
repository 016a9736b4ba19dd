"""The shift decoder (model/motion.py): exact whole-pixel moves, every shift reachable, gradients for
moves far beyond a pixel, and clear errors for bad options."""
from __future__ import annotations

import copy
import re

import pytest
import torch

from model import LatentActionModel, ModelConfig
from model.config import ShiftConfig
from model.motion import ShiftHead, match_features, match_shifts, shift_factors, shift_frame


def one_hot_factors(head: ShiftHead, dx: int, dy: int, batch: int = 1) -> list:
    """Factor weights that choose the shift (dx, dy) in every block: coarse steps first, the fine
    factor takes what is left."""
    remaining, factors = {-1: dx, -2: dy}, []
    for dim, step, side in head.factors:
        index = round(remaining[dim] / step) if step > 1 else remaining[dim]
        assert -side <= index <= side, (dx, dy, dim, step)
        remaining[dim] -= index * step
        weights = torch.zeros(batch, 2 * side + 1, *head.grid)
        weights[:, index + side] = 1
        factors.append((dim, step, weights))
    assert remaining == {-1: 0, -2: 0}
    return factors


def rolled(frame: torch.Tensor, dx: int, dy: int) -> torch.Tensor:
    """Reference: content moved right by dx and down by dy, zeros shifted in."""
    out = torch.zeros_like(frame)
    h, w = frame.shape[-2:]
    out[..., max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = \
        frame[..., max(-dy, 0):h - max(dy, 0), max(-dx, 0):w - max(dx, 0)]
    return out


@pytest.mark.parametrize("max_x, max_y", [(24, 8), (3, 2), (5, 0)])
def test_every_shift_in_range_is_exact(max_x, max_y):
    """Exact away from the frame's edge (a coarse step past the shift loses what it pushed out)."""
    head = ShiftHead(4, max_x, max_y, (30, 20))
    frame = torch.rand(1, 1, 210, 160)
    inside = (..., slice(max_y + 4, -max_y - 4), slice(max_x + 4, -max_x - 4))
    shifts = {(dx, dy) for dx in range(-max_x, max_x + 1) for dy in {-max_y, 0, max_y}}
    shifts |= {(dx, dy) for dx in {-max_x, 0, max_x} for dy in range(-max_y, max_y + 1)}
    for dx, dy in sorted(shifts):
        torch.testing.assert_close(shift_frame(frame, one_hot_factors(head, dx, dy))[inside],
                                   rolled(frame, dx, dy)[inside], rtol=0, atol=0)


def test_factors_cover_the_range_with_fewer_choices():
    for reach in range(0, 40):
        factors = shift_factors(reach)
        covered = {0}
        for step, side in factors:
            covered = {c + step * i for c in covered for i in range(-side, side + 1)}
        assert set(range(-reach, reach + 1)) <= covered
        assert sum(2 * side + 1 for _, side in factors) <= 2 * reach + 1 + 2


def test_blocks_choose_their_own_shift():
    """One block moves its content, its neighbour keeps its own: shifts are per destination block."""
    head = ShiftHead(4, 24, 8, (14, 10))            # 15 x 16 px blocks
    frame = torch.zeros(1, 1, 210, 160)
    frame[..., 190:194, 40:56] = 1.0                # a paddle across block columns 2 (x 32..47) and 3
    factors = one_hot_factors(head, 0, 0)
    moved = one_hot_factors(head, 14, 0)            # two coarse steps, no fine step
    for (_, _, keep), (_, _, move) in zip(factors, moved):
        keep[..., 3:5] = move[..., 3:5]             # block columns 3 and 4 (x 48..79) take +14
    out = shift_frame(frame, factors)[0, 0, 190:194]
    assert out[:, 40:48].eq(1).all()                # column 2 kept its own pixels,
    assert out[:, 48:54].eq(0).all()                # column 3 took x 34..39 (black) ...
    assert out[:, 54:70].eq(1).all()                # ... and the paddle from 14 px left
    assert out[:, 70:].eq(0).all() and out[:, :40].eq(0).all()


def plain_gather(frame, weights, dim, step):
    """The shift as the plain loop autograd differentiates by itself: the reference."""
    import torch.nn.functional as F

    batch, channels, height, width = frame.shape
    bins, grid_h, grid_w = weights.shape[1:]
    reach = step * (bins // 2)
    padded = F.pad(frame, (reach, reach) if dim == -1 else (0, 0, reach, reach))
    blocks = (batch, channels, grid_h, height // grid_h, grid_w, width // grid_w)
    per_block = weights.reshape(batch, bins, 1, grid_h, 1, grid_w, 1)
    terms = [padded.narrow(dim, 2 * reach - step * i, frame.shape[dim]).reshape(blocks) * per_block[:, i]
             for i in range(bins)]
    return sum(terms[1:], terms[0]).reshape(frame.shape)


@pytest.mark.parametrize("dim, step, bins", [(-1, 3, 7), (-2, 1, 5)])
def test_the_shifts_written_out_backward_is_the_true_gradient(dim, step, bins):
    """GatherShifted's hand-written backward against finite differences (float64), and its forward
    and gradients against the plain loop's."""
    from model.motion import _gather_shifted

    generator = torch.Generator().manual_seed(0)
    frame = torch.rand(2, 1, 14, 12, dtype=torch.float64, generator=generator, requires_grad=True)
    weights = torch.rand(2, bins, 7, 4, dtype=torch.float64, generator=generator, requires_grad=True)
    assert torch.autograd.gradcheck(lambda f, w: _gather_shifted(f, w, dim, step), (frame, weights))
    grad = torch.rand(2, 1, 14, 12, dtype=torch.float64, generator=generator)
    ours = torch.autograd.grad((_gather_shifted(frame, weights, dim, step) * grad).sum(), (frame, weights))
    theirs = torch.autograd.grad((plain_gather(frame, weights, dim, step) * grad).sum(), (frame, weights))
    assert torch.allclose(_gather_shifted(frame, weights, dim, step), plain_gather(frame, weights, dim, step))
    assert all(torch.allclose(a, b) for a, b in zip(ours, theirs))


def plain_splat(frame, weights, dim, step):
    """The source-indexed shift as a plain loop: each pixel, weighed by its own block's weight for
    shift i, rolled by step·(i − k) with what leaves the frame dropped."""
    batch, channels, height, width = frame.shape
    bins, grid_h, grid_w = weights.shape[1:]
    per_pixel = weights.repeat_interleave(height // grid_h, 2).repeat_interleave(width // grid_w, 3)
    out = torch.zeros_like(frame)
    for i in range(bins):
        shift = step * (i - bins // 2)
        moved = rolled(frame * per_pixel[:, i:i + 1], shift if dim == -1 else 0, shift if dim == -2 else 0)
        out = out + moved
    return out


@pytest.mark.parametrize("dim, step, bins", [(-1, 3, 7), (-2, 1, 5)])
def test_the_source_indexed_shift_is_the_plain_splat_and_its_backward_the_true_gradient(dim, step, bins):
    from model.motion import _splat_shifted

    generator = torch.Generator().manual_seed(0)
    frame = torch.rand(2, 1, 14, 12, dtype=torch.float64, generator=generator, requires_grad=True)
    weights = torch.rand(2, bins, 7, 4, dtype=torch.float64, generator=generator, requires_grad=True)
    assert torch.autograd.gradcheck(lambda f, w: _splat_shifted(f, w, dim, step), (frame, weights))
    assert torch.allclose(_splat_shifted(frame, weights, dim, step), plain_splat(frame, weights, dim, step))


def test_source_blocks_choose_where_their_pixels_go():
    """Indexed by source, the block that holds the paddle in frame t moves it, wherever it lands;
    indexed by destination the same weights would move whatever lands in that block instead."""
    head = ShiftHead(4, 24, 8, (14, 10))            # 15 x 16 px blocks
    frame = torch.zeros(1, 1, 210, 160)
    frame[..., 190:194, 48:64] = 1.0                # a paddle filling block column 3 (x 48..63)
    factors = one_hot_factors(head, 0, 0)
    moved = one_hot_factors(head, 14, 0)
    for (_, _, keep), (_, _, move) in zip(factors, moved):
        keep[..., 3] = move[..., 3]                 # only block column 3 takes +14
    out = shift_frame(frame, factors, indexed_by="source")[0, 0, 190:194]
    assert out[:, 62:78].eq(1).all() and out[:, :62].eq(0).all() and out[:, 78:].eq(0).all()
    gathered = shift_frame(frame, factors, indexed_by="destination")[0, 0, 190:194]
    assert gathered[:, 48:62].eq(0).all()           # block 3 took x 34..47 (black) from 14 px left


def test_a_far_move_gets_a_gradient_towards_the_right_shift():
    """The reason for a softmax over shifts: a 22 px paddle move over black gives the +21 coarse
    shift a gradient (a bilinear warp would see none)."""
    head = ShiftHead(4, 24, 8, (30, 20))
    frame = torch.zeros(1, 1, 210, 160)
    frame[..., 189:193, 40:56] = 1.0
    target = rolled(frame, 22, 0)
    logits = torch.zeros(1, sum(head.sizes), 30, 20, requires_grad=True)
    factors, start = [], 0
    for (dim, step, _), size in zip(head.factors, head.sizes):
        factors.append((dim, step, logits[:, start:start + size].softmax(1)))
        start += size
    (shift_frame(frame, factors) - target).pow(2).sum().backward()
    coarse = logits.grad[0, :head.sizes[0]].sum(dim=(1, 2))     # across, coarse: -21 .. 21 in steps of 7
    assert coarse.argmin().item() == 6                             # the most loss-lowering choice is +21


def test_shift_model_keeps_the_api_and_learns_a_move():
    torch.manual_seed(0)
    model = LatentActionModel(ModelConfig(width=0.125))
    cur = torch.zeros(4, 1, 210, 160)
    cur[..., 189:193, 40:56] = 0.5
    nxt = rolled(cur, 8, 0)
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    first = None
    for _ in range(20):
        loss = model(cur, nxt)["recon"]
        first = first if first is not None else loss.item()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    assert loss.item() < 0.5 * first
    model.eval()
    codes = model.encode(cur, nxt)
    pred = model.decode(cur, codes)
    assert pred.shape == cur.shape and 0 <= pred.min() and pred.max() <= 1
    torch.testing.assert_close(model(cur, nxt)["pred"], pred, rtol=0, atol=1e-6)


def test_encoder_jitter_moves_each_pair_in_training_and_nothing_at_inference():
    """encoder_jitter: in training the encoder sees each pair moved across by its own shift (both
    frames alike, zeros shifted in); in eval mode it sees the pair as it is, so codes are unchanged."""
    from model.networks import moved_across

    torch.manual_seed(0)
    cur, nxt = torch.rand(64, 1, 210, 160), torch.rand(64, 1, 210, 160)
    moved_cur, moved_nxt, none = moved_across([cur, nxt, None], 5)
    assert none is None
    shifts = set()
    for i in range(64):
        shift = next(s for s in range(-5, 6) if torch.equal(moved_cur[i], rolled(cur[i], s, 0)))
        assert torch.equal(moved_nxt[i], rolled(nxt[i], shift, 0))
        shifts.add(shift)
    assert len(shifts) > 5                          # a shift per sample, not one for the batch

    plain, jittered = (LatentActionModel(ModelConfig(width=0.125, encoder_jitter=j)) for j in (0, 8))
    jittered.load_state_dict(plain.state_dict())
    plain.eval(), jittered.eval()
    assert torch.equal(plain.encode(cur[:2], nxt[:2]), jittered.encode(cur[:2], nxt[:2]))
    plain.train(), jittered.train()                 # the same weights, the same mode: only the jitter differs
    assert not torch.equal(jittered.encoder(cur[:8], nxt[:8]), plain.encoder(cur[:8], nxt[:8]))


def test_jitter_until_trains_on_unmoved_pairs_from_its_step_on():
    """jitter_until: the encoder's view moves for the first updates only; from the step it names, an
    update is bit for bit the update of the same weights in a model that never moves it (and the
    updates before it are not)."""
    from training.runtime import Runtime
    from training.step import TrainStep

    cpu = Runtime(0, 1, 0, torch.device("cpu"))
    cur = torch.rand(4, 1, 210, 160, generator=torch.Generator().manual_seed(0))
    batch = {"cur": cur, "next": torch.roll(cur, 3, dims=-1)}

    def trainer(jitter: int, until: int | None = None, weights: LatentActionModel | None = None):
        torch.manual_seed(0)
        model = LatentActionModel(ModelConfig(width=0.0625, code_dim=32, encoder_jitter=jitter)).train()
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        if weights is not None:
            model.load_state_dict(weights.state_dict())
        return TrainStep(model, optimizer, cpu, jitter_until=until), model, optimizer

    moving, model, optimizer = trainer(8, until=2)
    still, never_moved, _ = trainer(0)
    for step in (moving, still):
        torch.manual_seed(1)
        for i in (0, 1):
            step(iter([batch]), 1e-3, i)
    # steps 0 and 1: the view moved (the codes reach the decoder from step 1 on: its FiLMs start at 0)
    assert not torch.equal(model.encoder.project.weight, never_moved.encoder.project.weight)
    # step 2 on: the same weights and optimiser state in a model without a moved view, the same RNG
    unmoved, twin, twin_optimizer = trainer(0, weights=model)
    twin_optimizer.load_state_dict(copy.deepcopy(optimizer.state_dict()))     # (it would share the tensors)
    for step in (2, 3):
        rng = torch.get_rng_state()
        ours = moving(iter([batch]), 1e-3, step).terms
        torch.set_rng_state(rng)
        assert unmoved(iter([batch]), 1e-3, step).terms == ours
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), twin.state_dict().values()))


@pytest.mark.parametrize("settings, message", [
    (["jitter_until=0.5"], "jitter_until: the encoder's view is never moved (set encoder_jitter > 0)"),
    (["encoder_jitter=8", "jitter_until=1.5"], "jitter_until must be in [0, 1], got 1.5"),
])
def test_bad_jitter_until_is_one_line(tmp_path, capsys, settings, message):
    import train

    code = train.main(["--shards", str(tmp_path), "--preset", "tiny", *[a for s in settings for a in ("--set", s)]])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and message in err, err


@pytest.mark.parametrize("make, message", [
    (lambda: ModelConfig(encoder_jitter=81), "encoder_jitter must be in [0, 80] px, got 81"),
    (lambda: ModelConfig(output="warp"), "output must be one of sigmoid, residual, shift"),
    (lambda: ModelConfig(shift=ShiftConfig(max_x=-1)), "shift.max_x and shift.max_y must be in [0, 80] and [0, 105]"),
    (lambda: ModelConfig(shift=ShiftConfig(max_y=-3)), "shift.max_x and shift.max_y must be in [0, 80] and [0, 105]"),
    (lambda: ModelConfig(shift=ShiftConfig(max_y=106)), "shift.max_x and shift.max_y must be in [0, 80] and [0, 105]"),
    (lambda: ModelConfig(shift=ShiftConfig(stage=4)), "shift.stage must be in 0..3"),
])
def test_bad_shift_options_are_refused(make, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        make()


@pytest.mark.parametrize("setting, message", [
    ("output=warp", "output must be one of sigmoid, residual, shift"),
    ("shift.stage=4", "shift.stage must be in 0..3"),
    ("shift.indexed_by=target", "shift.indexed_by must be one of destination, source, got 'target'"),
])
def test_bad_shift_option_on_the_command_line_is_one_line(tmp_path, capsys, setting, message):
    import train

    code = train.main(["--shards", str(tmp_path), "--preset", "tiny", "--set", setting])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and message in err


# ------------------------------------------------------------------------------------ matching
def test_matching_names_the_move_wherever_it_happens_in_the_cell():
    """The encoder's matching features peak (near 1) at the true move wherever in the cell it happens,
    and are 0 where nothing changed: what a code must name is the move, not the place."""
    shifts = match_shifts(24, 8)
    for x in (33, 38, 43):                              # three places in cell column 1 (x 32..63)
        cur = torch.zeros(1, 1, 210, 160)
        cur[..., 189:193, x:x + 16] = 0.43
        nxt = rolled(cur, 5, 0)
        features = match_features(cur, nxt, shifts, (7, 5))
        assert features[0, :, :6].abs().max() == 0       # rows of cells where nothing changed
        assert shifts[int(features[0, :, 6, 1].argmax())] == (5, 0) and features[0, :, 6, 1].max() > 0.99


def test_matching_finds_a_diagonal_ball_move():
    shifts = match_shifts(24, 8)
    cur = torch.zeros(1, 1, 210, 160)
    cur[..., 100:104, 70:72] = 0.43
    nxt = rolled(cur, -6, 4)
    features = match_features(cur, nxt, shifts, (7, 5))
    assert shifts[int(features[0, :, 3, 2].argmax())] == (-6, 4)


def test_encoder_with_matching_keeps_the_api():
    torch.manual_seed(0)
    model = LatentActionModel(ModelConfig.named("match", width=0.125)).eval()
    cur = torch.rand(2, 1, 210, 160)
    nxt = rolled(cur, 5, 0)
    codes = model.encode(cur, nxt)
    assert codes.shape == (2, 7, 5) and model.decode(cur, codes).shape == cur.shape
