"""Finite scalar quantisation (model/fsq.py): codes and vectors agree, every code is reachable,
gradients reach the encoder, and bad levels are one clear error."""
from __future__ import annotations

import itertools

import pytest
import torch

from model import LatentActionModel, ModelConfig
from model.config import FSQConfig
from model.fsq import ScalarQuantizer


def quantizer(levels: str = "8,8,4", code_dim: int = 16) -> ScalarQuantizer:
    torch.manual_seed(0)
    return ScalarQuantizer(FSQConfig(levels).levels, code_dim)


@pytest.mark.parametrize("levels", ["8,8,4", "5,5,5,2", "4,4,4,4"])
def test_codes_and_vectors_agree_and_every_code_is_reachable(levels):
    q = quantizer(levels)
    quantised, codes, losses = q(3 * torch.randn(8, 16, 7, 5))
    assert codes.dtype == torch.int64 and codes.shape == (8, 7, 5)
    assert 0 <= codes.min() and codes.max() < q.codebook_size
    torch.testing.assert_close(q.lookup(codes), quantised, rtol=0, atol=1e-5)
    assert all(float(v) == 0 for v in losses.values())
    # every grid point is some code: the scalars' rounded values, read back from the codes, cover
    # each level of each scalar, and the codebook has codebook_size distinct rows
    digits = torch.div(torch.arange(q.codebook_size).view(1, 1, -1, 1), q.basis, rounding_mode="floor") % q.levels.long()
    grid = {tuple(d) for d in digits[0, :, :, 0].t().tolist()}
    assert grid == set(itertools.product(*(range(int(level)) for level in q.levels.flatten())))
    assert torch.unique(q.codebook, dim=0).shape[0] == q.codebook_size


def test_rounding_gives_each_scalar_exactly_its_levels():
    q = quantizer("8,5,4")
    bounded = q.bound(torch.linspace(-20, 20, 4001).view(1, 1, -1, 1).expand(1, 3, -1, 1))
    for i, level in enumerate((8, 5, 4)):
        assert len(torch.unique(bounded[0, i].round())) == level


def test_gradient_reaches_the_encoder_through_the_rounding():
    q = quantizer()
    z = torch.randn(2, 16, 7, 5, requires_grad=True)
    quantised, _, _ = q(z)
    quantised.square().sum().backward()
    assert z.grad is not None and z.grad.abs().sum() > 0


def test_fsq_model_keeps_the_api():
    torch.manual_seed(0)
    model = LatentActionModel(ModelConfig(width=0.125)).eval()
    cur, nxt = torch.rand(2, 1, 210, 160), torch.rand(2, 1, 210, 160)
    codes = model.encode(cur, nxt)
    assert codes.shape == (2, 7, 5) and model.codebook.shape == (256, 128)
    torch.testing.assert_close(model.decode(cur, codes), model(cur, nxt)["pred"], rtol=0, atol=1e-6)
    assert model.reset_dead_codes() == 0


@pytest.mark.parametrize("make, message", [
    (lambda: ModelConfig(quantizer="lfq"), "quantizer must be one of vq, fsq"),
    (lambda: ModelConfig(fsq=FSQConfig("8,x,4")), "comma-separated integers >= 2"),
    (lambda: ModelConfig(fsq=FSQConfig("256,1")), "integers >= 2"),
])
def test_bad_quantizer_options_are_refused(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_the_number_of_codes_follows_from_the_levels():
    assert ModelConfig(fsq=FSQConfig((8, 8))).codebook_size == 64
    assert ModelConfig(fsq=FSQConfig("8,8,8")).codebook_size == 512
    with pytest.raises(ValueError, match="make 131072 codes"):
        FSQConfig((64, 64, 32))


def test_a_checkpoint_without_the_field_is_a_vector_quantiser():
    assert ModelConfig.from_dict({"width": 0.125}).quantizer == "vq"


def test_a_code_outside_the_codebook_is_an_error_not_another_code():
    """FSQ's digits are taken `% levels`: code 259 of a 256-code quantiser would be drawn as code 3.
    The lookup refuses it (and a negative code); the nearest-code quantiser's lookup does too."""
    from model.config import VQConfig
    from model.quantizer import Quantizer

    q = quantizer("8,8,4")
    assert torch.equal(q.lookup(torch.full((1, 7, 5), 3)), q.lookup(torch.full((1, 7, 5), 3)))
    for code in (259, 256, -1):
        with pytest.raises(ValueError, match=rf"code {code} is outside the codebook's 256 codes \(0\.\.255\)"):
            q.lookup(torch.full((1, 7, 5), code))
    vq = Quantizer(VQConfig(codes=16), 8)
    with pytest.raises(ValueError, match="code 16 is outside the codebook's 16 codes"):
        vq.lookup(torch.full((1, 7, 5), 16))
