"""The latent action model: encoder + quantiser + decoder, and the API other stages use."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model.config import ModelConfig
from model.networks import Decoder, Encoder
from model.fsq import ScalarQuantizer
from model.quantizer import Quantizer

CHANGED = 0.5 / 255      # frames are 8-bit: any pixel whose value changed


class LatentActionModel(nn.Module):
    def __init__(self, config: ModelConfig | None = None):
        super().__init__()
        self.config = config = config or ModelConfig()
        self.encoder = Encoder(config.in_channels, config.channels, config.code_dim, config.encoder_input,
                               config.context,
                               (config.motion_max_x, config.motion_max_y) if config.encoder_match else None)
        self.quantizer = ScalarQuantizer(config) if config.quantizer == "fsq" else Quantizer(config)
        self.decoder = Decoder(config.in_channels, config.channels, config.code_dim, config.decoder_skips,
                               config.latent_every_stage, config.residual_output, config.context, config.motion,
                               (config.motion_max_x, config.motion_max_y), config.motion_stage,
                               config.motion_grid, config.motion_codes)
        rows, cols = config.grid
        self.action_head = (nn.Linear(config.code_dim * rows * cols, config.action_classes)
                            if config.action_classes else None)

    def set_grad_checkpoint(self, enabled: bool) -> None:
        """Recompute each conv stage in backward (memory for time): a training setting, off when built."""
        self.encoder.stack.grad_checkpoint = enabled
        self.decoder.frame_stack.grad_checkpoint = enabled
        self.decoder.up_stack.grad_checkpoint = enabled

    def forward(self, cur: torch.Tensor, nxt: torch.Tensor, prev: torch.Tensor | None = None,
                action: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Frames (B, C, 210, 160) in [0, 1] -> {"pred": (B, C, 210, 160), "codes": (B, 7, 5) int64,
        "loss": total, "recon", "commitment", "codebook", "entropy", "action"}. `prev` is frame t-1
        (see `previous_frame`); `action` int64 (B,) the recorded actions of labelled pairs (-1 where
        none), which train the action head when the model has one."""
        prev = self.previous_frame(cur, prev)
        quantised, codes, losses = self.quantizer(self.encoder(cur, nxt, prev))
        pred = self.decoder(cur, quantised, prev)
        recon = self.reconstruction_loss(pred, cur, nxt)
        losses["action"] = self.action_loss(quantised, action)
        total = recon + losses["commitment"] + losses["codebook"] + losses["entropy"] + losses["action"]
        return {"pred": pred, "codes": codes, "loss": total, "recon": recon, **losses}

    def action_loss(self, quantised: torch.Tensor, action: torch.Tensor | None) -> torch.Tensor:
        """Weighted cross-entropy of the action head over the labelled pairs (0 without labels or
        head). The head reads the whole quantised grid linearly, so its gradient asks the codes
        themselves to name the action, through the straight-through estimator."""
        if self.action_head is None or action is None:
            return quantised.new_zeros((), dtype=torch.float32)
        logits = self.action_head(quantised.flatten(1).float())
        labelled = (action >= 0).float()
        per_pair = F.cross_entropy(logits, action.clamp(min=0), reduction="none")
        return self.config.action_weight * (per_pair * labelled).sum() / labelled.sum().clamp(min=1)

    def reconstruction_loss(self, pred: torch.Tensor, cur: torch.Tensor, nxt: torch.Tensor) -> torch.Tensor:
        """MSE, with pixels that changed between t and t+1 weighted by changed_pixel_weight: plain MSE
        is 99.7 % unchanged pixels, which the copy of frame t already gets right."""
        pred, cur, nxt = pred.float(), cur.float(), nxt.float()
        if self.config.changed_pixel_weight == 1:
            return F.mse_loss(pred, nxt)
        changed = (nxt - cur).abs() > CHANGED
        weight = 1 + (self.config.changed_pixel_weight - 1) * changed.float()
        return (weight * (pred - nxt).pow(2)).mean()

    @torch.no_grad()
    def encode(self, cur: torch.Tensor, nxt: torch.Tensor, prev: torch.Tensor | None = None) -> torch.Tensor:
        """Frame pairs (and frame t-1) -> latent action codes, int64 (B, 7, 5) in [0, codebook_size)."""
        prev = self.previous_frame(cur, prev)
        _, codes, _ = self.quantizer(self.encoder(cur, nxt, prev))
        return codes

    @torch.no_grad()
    def decode(self, cur: torch.Tensor, codes: torch.Tensor, prev: torch.Tensor | None = None) -> torch.Tensor:
        """Frame t (and frame t-1) and codes (B, 7, 5) -> predicted frame t+1 (B, C, 210, 160) in [0, 1]."""
        prev = self.previous_frame(cur, prev)
        return self.decoder(cur, self.quantizer.lookup(codes.long()), prev)

    def previous_frame(self, cur: torch.Tensor, prev: torch.Tensor | None) -> torch.Tensor | None:
        """The frame t-1 the networks get: None for a model without context (a given `prev` is
        checked, then ignored); frame t itself when a context model is given none, as the loader
        does at an episode's first pair."""
        if prev is not None and prev.shape != cur.shape:
            raise ValueError(f"prev has shape {tuple(prev.shape)}, but cur has {tuple(cur.shape)}: "
                             f"prev must be frame t-1 shaped like frame t")
        if not self.config.context:
            return None
        return cur if prev is None else prev

    @property
    def codebook(self) -> torch.Tensor:
        """The code vectors (codebook_size, code_dim), detached."""
        return self.quantizer.codebook.detach()

    def reset_dead_codes(self) -> int:
        return self.quantizer.reset_dead_codes()
