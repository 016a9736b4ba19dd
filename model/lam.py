"""The latent action model: encoder + quantiser + decoder, and the API other stages use."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model.config import ModelConfig
from model.networks import Decoder, Encoder
from model.fsq import ScalarQuantizer
from model.move_target import horizontal_move_target
from model.quantizer import Quantizer

CHANGED = 0.5 / 255      # frames are 8-bit: any pixel whose value changed


class LatentActionModel(nn.Module):
    def __init__(self, config: ModelConfig | None = None):
        super().__init__()
        self.config = config = config or ModelConfig()
        self.encoder = Encoder(config)
        self.quantizer = (ScalarQuantizer(config.fsq.levels, config.code_dim) if config.quantizer == "fsq"
                          else Quantizer(config.vq, config.code_dim))
        self.decoder = Decoder(config)
        rows, cols = config.grid
        self.action_head = (nn.Linear(config.code_dim * rows * cols, config.action_classes)
                            if config.action_classes else None)
        # the move prior (ModelConfig.motion_weight): each cell's code says which way its content moved
        self.motion_head = nn.Conv2d(config.code_dim, 1, 1) if config.motion_weight else None
        # Genie's split (ModelConfig.action_code): one small code per frame, read from every cell's
        # encoder output, and the latent that stands in for a dropped grid.
        split = config.action_code
        self.to_action = nn.Linear(config.code_dim * rows * cols, config.code_dim) if split else None
        self.action_quantizer = ScalarQuantizer(split.levels, config.code_dim) if split else None
        self.no_grid = nn.Parameter(torch.zeros(config.code_dim, rows, cols)) if split else None

    def set_grad_checkpoint(self, enabled: bool) -> None:
        """Recompute each conv stage in backward (memory for time): a training setting, off when built."""
        self.encoder.stack.grad_checkpoint = enabled
        self.decoder.frame_stack.grad_checkpoint = enabled
        self.decoder.up_stack.grad_checkpoint = enabled

    def forward(self, cur: torch.Tensor, nxt: torch.Tensor, prev: torch.Tensor | None = None,
                action: torch.Tensor | None = None, start: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Frames (B, C, 210, 160) in [0, 1] -> {"pred": (B, C, 210, 160), "codes": (B, 7, 5) int64,
        "loss": total, "recon", "commitment", "codebook", "entropy", "action", "motion"}. `prev` is frame t-1
        (see `previous_frame`); `action` int64 (B,) the recorded actions of labelled pairs (-1 where
        none), which train the action head when the model has one; `start` the frame the decoder
        moves, when it is not frame t itself (training on the model's own frames: the codes come
        from the recorded pair, the decoder starts from what the model drew of frame t)."""
        prev = self.previous_frame(cur, prev)
        encoded = self.encoder(cur, nxt, prev)
        quantised, codes, losses = self.quantizer(encoded)
        action_codes, action_latent = self.quantise_action(encoded)
        pred = self.decoder(cur if start is None else start, self.decoder_latent(quantised, action_latent, drop=self.training),
                            prev)
        recon = self.reconstruction_loss(pred, cur, nxt)
        losses["action"] = self.action_loss(quantised, action)
        losses["motion"] = self.motion_loss(quantised, cur, nxt)
        total = (recon + losses["commitment"] + losses["codebook"] + losses["entropy"] + losses["action"]
                 + losses["motion"])
        extra = {} if action_codes is None else {"action_codes": action_codes}
        return {"pred": pred, "codes": codes, "loss": total, "recon": recon, **losses, **extra}

    def quantise_action(self, encoded: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The per-frame action code, int64 (B,), and its latent (B, D, 1, 1); (None, None) without one."""
        if self.action_quantizer is None:
            return None, None
        latent, codes, _ = self.action_quantizer(self.to_action(encoded.flatten(1).float())[:, :, None, None])
        return codes[:, 0, 0], latent

    def decoder_latent(self, grid: torch.Tensor | None, action_latent: torch.Tensor | None,
                       drop: bool = False) -> torch.Tensor:
        """What the decoder is conditioned on: the grid's latent (B, D, 7, 5), or the "no grid"
        latent where it is None or dropped (`drop`: a grid_dropout share of the pairs, in
        training), plus the action code's latent in every cell."""
        if action_latent is None:
            return grid
        batch = action_latent.shape[0]
        no_grid = self.no_grid.unsqueeze(0).expand(batch, -1, -1, -1)
        if grid is None:
            grid = no_grid
        elif drop and self.config.action_code.grid_dropout:
            dropped = torch.rand(batch, 1, 1, 1, device=grid.device) < self.config.action_code.grid_dropout
            grid = torch.where(dropped, no_grid.to(grid.dtype), grid)
        return grid + action_latent.to(grid.dtype)

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

    def motion_loss(self, quantised: torch.Tensor, cur: torch.Tensor, nxt: torch.Tensor) -> torch.Tensor:
        """The move prior's weighted squared error (0 without the head): a 1 x 1 conv reads each
        cell's quantised vector and says which way the content around the cell moved across, the
        target read from the recorded pair's pixels (model/move_target.py), over the cells where
        something moved. Its gradient reaches the codes through the straight-through estimator."""
        if self.motion_head is None:
            return quantised.new_zeros((), dtype=torch.float32)
        target, moved = horizontal_move_target(cur, nxt, self.config.grid)
        guess = self.motion_head(quantised.float())[:, 0]
        return self.config.motion_weight * (((guess - target).pow(2) * moved).sum() / moved.sum().clamp(min=1))

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
        return self.encode_both(cur, nxt, prev)[0]

    @torch.no_grad()
    def encode_action(self, cur: torch.Tensor, nxt: torch.Tensor, prev: torch.Tensor | None = None) -> torch.Tensor:
        """The per-frame action code, int64 (B,) in [0, action_codes), of a model that has one."""
        if self.action_quantizer is None:
            raise ValueError("this model has no per-frame action code (ModelConfig.action_code)")
        return self.encode_both(cur, nxt, prev)[1]

    @torch.no_grad()
    def encode_both(self, cur: torch.Tensor, nxt: torch.Tensor,
                    prev: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(the grid's codes, the per-frame action code or None) from one pass of the encoder."""
        encoded = self.encoder(cur, nxt, self.previous_frame(cur, prev))
        return self.quantizer(encoded)[1], self.quantise_action(encoded)[0]

    @torch.no_grad()
    def decode(self, cur: torch.Tensor, codes: torch.Tensor | None, prev: torch.Tensor | None = None,
               action: torch.Tensor | None = None) -> torch.Tensor:
        """Frame t (and frame t-1) and codes (B, 7, 5) -> predicted frame t+1 (B, C, 210, 160) in [0, 1].
        A model with a per-frame action code needs it (`action`, int64 (B,)) and may be given no grid
        (`codes` None): then it draws t+1 from the past and the action alone, as it is played."""
        prev = self.previous_frame(cur, prev)
        if self.action_quantizer is None:
            if codes is None or action is not None:
                raise ValueError("this model decodes a code grid and no action code (ModelConfig.action_code)")
            return self.decoder(cur, self.quantizer.lookup(codes.long()), prev)
        if action is None:
            raise ValueError("this model's decoder needs the per-frame action code (`action`)")
        grid = None if codes is None else self.quantizer.lookup(codes.long())
        action_latent = self.action_quantizer.lookup(action.long().view(-1, 1, 1))
        return self.decoder(cur, self.decoder_latent(grid, action_latent), prev)

    @property
    def action_codes(self) -> int:
        """How many per-frame action codes the model has (0: none)."""
        return 0 if self.action_quantizer is None else self.action_quantizer.codebook_size

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
