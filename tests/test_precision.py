"""model/precision.py: inference's precision rule, with the hardware's capability and the measured
agreement injected (no timing), and the agreement measurement against hand-made differences."""
from __future__ import annotations

import math

import pytest
import torch

from model.precision import (CODE_AGREEMENT, PSNR_GAP_DB, Agreement, measure_agreement, native_bf16,
                             precision_rule)


def agreement(code_cells: float = 1.0, gap_db: float = 0.0) -> Agreement:
    return Agreement(pairs=256, code_cells=code_cells, psnr_fp32=42.0, psnr_low=42.0 - gap_db, psnr_between=70.0)


def never_measured() -> Agreement:
    raise AssertionError("agreement measured where bf16 is not native")


def test_auto_is_fp32_without_native_bf16_and_does_not_measure():
    precision = precision_rule("auto", None, never_measured)
    assert precision.dtype is None and precision.name == "fp32" and "no native bf16" in precision.reason


def test_auto_is_bf16_where_native_and_faithful():
    precision = precision_rule("auto", "amx_bf16", lambda: agreement(code_cells=0.999, gap_db=0.002))
    assert precision.dtype is torch.bfloat16 and "amx_bf16" in precision.describe()
    assert precision.agreement.passes


@pytest.mark.parametrize("measured", [agreement(code_cells=CODE_AGREEMENT - 1e-4),      # codes below the bar
                                      agreement(gap_db=PSNR_GAP_DB),                    # frames at the bar
                                      agreement(gap_db=-0.5)])                          # bf16 better by 0.5 dB: still apart
def test_auto_is_fp32_where_native_but_not_faithful(measured):
    precision = precision_rule("auto", "GPU", lambda: measured)
    assert precision.dtype is None and "not faithful" in precision.reason and precision.agreement == measured


def test_an_explicit_amp_is_obeyed_without_measuring():
    assert precision_rule("bf16", None, never_measured).dtype is torch.bfloat16
    assert precision_rule("fp16", None, never_measured).dtype is torch.float16
    assert precision_rule("off", "amx_bf16", never_measured).dtype is None
    with pytest.raises(ValueError, match="amp must be one of"):
        precision_rule("fp8", None, never_measured)


def test_native_bf16_of_a_cpu_is_its_flag(monkeypatch):
    import model.precision

    monkeypatch.setattr(model.precision, "cpu_native_bf16", lambda: "avx512_bf16")
    assert native_bf16(torch.device("cpu")) == "avx512_bf16"
    monkeypatch.setattr(model.precision, "cpu_native_bf16", lambda: None)
    assert native_bf16(torch.device("cpu")) is None


class AutocastSensitiveModel:
    """Codes and frames that change in a known way under autocast: one cell of 35 takes another
    code, and the prediction is off by 0.01 everywhere (the fp32 one is exact)."""

    action_codes = 0

    def encode_both(self, cur, nxt, prev=None):
        codes = torch.zeros(len(cur), 7, 5, dtype=torch.int64)
        if torch.is_autocast_enabled("cpu"):
            codes[:, 0, 0] = 1
        return codes, None

    def decode(self, cur, codes, prev=None, action=None):
        assert action is None
        return (cur + 0.01) if torch.is_autocast_enabled("cpu") else cur


def test_agreement_counts_cells_and_compares_psnr_against_the_true_frame():
    frames = torch.full((4, 1, 8, 8), 0.5)
    batches = [{"cur": frames, "next": frames}, {"cur": frames[:2], "next": frames[:2]}]
    measured = measure_agreement(AutocastSensitiveModel(), batches, torch.device("cpu"))
    assert measured.pairs == 6
    assert measured.code_cells == pytest.approx(34 / 35)
    assert measured.psnr_fp32 == math.inf and measured.psnr_low == pytest.approx(40.0)   # MSE 1e-4
    assert measured.psnr_between == pytest.approx(40.0) and not measured.passes
