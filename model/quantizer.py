"""Vector quantiser: nearest code in fp32, straight-through gradient, commitment + codebook losses,
a differentiable codebook-entropy regulariser, and dead-code resets from recent encoder outputs.

All state (codebook usage since the last reset, a ring buffer of recent encoder outputs) lives in
buffers, so it is checkpointed with the weights. Under DDP the usage counts are all-reduced and the
replacement vectors come from rank 0, so every rank keeps the same codebook.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from model.config import VQConfig
from model.fsq import check_codes


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


class Quantizer(nn.Module):
    ENTROPY_NEIGHBOURS = 8        # soft assignments are scaled to spread over about this many codes

    def __init__(self, config: VQConfig, code_dim: int):
        """Sizes and loss weights from `config`: VQConfig is where their defaults are stated."""
        super().__init__()
        codebook_size, reset_buffer = config.codes, config.reset_buffer
        self.codebook_size, self.code_dim = codebook_size, code_dim
        self.commitment_weight, self.codebook_weight = config.commitment_weight, config.codebook_weight
        self.entropy_weight, self.entropy_temperature = config.entropy_weight, config.entropy_temperature
        self.codebook = nn.Parameter(torch.empty(codebook_size, code_dim).uniform_(-1 / codebook_size, 1 / codebook_size))
        # Counts since the last reset decide which codes are dead; float so all_reduce(SUM) is exact enough.
        self.register_buffer("usage", torch.zeros(codebook_size))
        self.register_buffer("recent", torch.zeros(reset_buffer, code_dim))
        self.register_buffer("recent_next", torch.zeros((), dtype=torch.long))    # ring-buffer write position
        self.register_buffer("recent_count", torch.zeros((), dtype=torch.long))   # filled rows (<= reset_buffer)
        # The uniform init sits far from the encoder's outputs, so most codes would never win; the
        # first training batch seeds the codebook instead (as k-means-style init does).
        self.register_buffer("initialised", torch.zeros((), dtype=torch.bool))
        # A Python mirror of `initialised`, so the per-step check is no graph break under torch.compile.
        self._seeded = False
        self.register_load_state_dict_post_hook(_sync_seeded_flag)

    # ---------------------------------------------------------------------------------- forward
    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """z (B, D, H, W) -> quantised (B, D, H, W) with straight-through gradient, codes (B, H, W) int64,
        losses by name (commitment, codebook, entropy; already weighted)."""
        with torch.autocast(device_type=z.device.type, enabled=False):
            z = z.float()
            b, d, h, w = z.shape
            flat = z.permute(0, 2, 3, 1).reshape(-1, d)
            if self.training and not self._seeded:
                self._seed_codebook(flat.detach())
            distances = self.distances(flat)
            codes = distances.argmin(dim=1)
            quantised = F.embedding(codes, self.codebook)
            losses = {
                "commitment": self.commitment_weight * F.mse_loss(flat, quantised.detach()),
                "codebook": self.codebook_weight * F.mse_loss(quantised, flat.detach()),
                "entropy": self.entropy_weight * self.entropy_loss(distances),
            }
            if self.training:
                self._record(flat.detach(), codes)
            quantised = flat + (quantised - flat).detach()        # straight-through estimator
            quantised = quantised.reshape(b, h, w, d).permute(0, 3, 1, 2).contiguous()
        return quantised, codes.reshape(b, h, w), losses

    def distances(self, flat: torch.Tensor) -> torch.Tensor:
        """Squared euclidean distance of each row of `flat` (N, D) to every code: (N, K), fp32."""
        codebook = self.codebook.float()
        return (flat.pow(2).sum(1, keepdim=True) - 2 * flat @ codebook.t() + codebook.pow(2).sum(1)[None, :])

    def entropy_loss(self, distances: torch.Tensor) -> torch.Tensor:
        """Mean per-sample entropy plus (log K minus the entropy of the batch-mean assignment): 0 when
        each vector sits on one code and the batch spreads evenly over all K codes.

        Soft assignments softmax(-(d - d_nearest) / (τ·gap)), gap = (detached) distance from the
        nearest to the 8th-nearest code of that vector. Raw distances give a one-hot softmax (no
        gradient); scaling by the mean distance, dominated by far-away codes, gives a nearly flat one
        over the nearest dozen codes. The gap puts the k-th neighbour at logit -1/τ, whatever the
        latent scale. Low per-sample entropy pulls each vector to a code; high batch entropy moves
        vectors towards under-used codes. Both gradients reach the encoder through d.
        """
        k = min(self.ENTROPY_NEIGHBOURS, distances.shape[1]) - 1
        nearest_k = distances.detach().topk(k + 1, dim=1, largest=False).values
        gap = (nearest_k[:, k] - nearest_k[:, 0]).clamp_min(1e-6)[:, None]
        logits = -(distances - nearest_k[:, :1]) / (self.entropy_temperature * gap)
        probs = logits.softmax(dim=1)
        per_sample = -(probs * logits.log_softmax(dim=1)).sum(1).mean()
        mean_probs = probs.mean(0)
        batch = -(mean_probs * mean_probs.clamp_min(1e-12).log()).sum()
        return per_sample + (math.log(self.codebook_size) - batch)

    def forward_state(self) -> dict:
        """What a training forward pass changes besides the buffers: the codebook, which the first
        batch seeds (TrainStep puts it back when it skips a non-finite step)."""
        return {"codebook": self.codebook.detach().clone()}

    @torch.no_grad()
    def restore_forward_state(self, state: dict) -> None:
        self.codebook.copy_(state["codebook"])
        self._seeded = bool(self.initialised)

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes (B, H, W) -> quantised vectors (B, D, H, W), as the forward pass produces them; a code
        outside the codebook is a ValueError (on a GPU an embedding's own check is a device assert)."""
        check_codes(codes, self.codebook.shape[0])
        return F.embedding(codes, self.codebook).permute(0, 3, 1, 2).contiguous()

    # ---------------------------------------------------------------------------------- state
    @torch.no_grad()
    def _record(self, flat: torch.Tensor, codes: torch.Tensor) -> None:
        """Count code usage and push this batch's encoder outputs into the ring buffer (static shapes,
        so torch.compile needs no graph break)."""
        self.usage.index_add_(0, codes, torch.ones_like(codes, dtype=self.usage.dtype))
        capacity = self.recent.shape[0]
        rows = flat[-capacity:] if flat.shape[0] > capacity else flat
        positions = (self.recent_next + torch.arange(rows.shape[0], device=rows.device)) % capacity
        self.recent.index_copy_(0, positions, rows)
        self.recent_next.copy_((self.recent_next + rows.shape[0]) % capacity)
        self.recent_count.copy_((self.recent_count + rows.shape[0]).clamp(max=capacity))

    @torch.no_grad()
    def _seed_codebook(self, flat: torch.Tensor) -> None:
        picks = torch.randint(flat.shape[0], (self.codebook_size,), device=flat.device)
        seeds = flat[picks] + 1e-3 * flat.std() * torch.randn_like(flat[picks])
        if _distributed():
            dist.broadcast(seeds, src=0)
        self.codebook.data.copy_(seeds)
        self.initialised.fill_(True)
        self._seeded = True

    @staticmethod
    def _far_samples(candidates: torch.Tensor, live_codes: torch.Tensor, n: int) -> torch.Tensor:
        """n rows of `candidates` drawn with probability ∝ squared distance to the nearest live code
        (k-means++ seeding). Uniform draws would mostly pick the dominant content (black background
        cells), duplicating a live code that then wins every contest; far samples cover the rare
        content the codebook misses."""
        candidates = candidates.float()
        nearest = torch.cdist(candidates, live_codes.float()).amin(dim=1).pow(2)
        if not torch.isfinite(nearest).all() or nearest.sum() <= 0:
            nearest = torch.ones_like(nearest)
        picks = torch.multinomial(nearest, n, replacement=int((nearest > 0).sum()) < n)
        return candidates[picks].clone()

    @torch.no_grad()
    def reset_dead_codes(self) -> int:
        """Replace every code unused since the last reset by a recent encoder output far from the live
        codes; returns how many were replaced (none when every code is dead: nothing to measure
        distance to, which happens only before training has seen data). Training only; under DDP every rank must call it (collectives)."""
        if not self.training:
            return 0
        usage = self.usage.clone()
        available = self.recent_count.clone()
        if _distributed():
            dist.all_reduce(usage)
            dist.all_reduce(available, op=dist.ReduceOp.MIN)
        dead = usage == 0
        n_dead = int(dead.sum())
        if n_dead and int(available) > 0 and not bool(dead.all()):
            replacements = self._far_samples(self.recent[: int(available)], self.codebook[~dead].detach(), n_dead)
            if _distributed():
                dist.broadcast(replacements, src=0)
            self.codebook.data[dead] = replacements.to(self.codebook.dtype)
        else:
            n_dead = 0
        self.usage.zero_()
        return n_dead


def _sync_seeded_flag(module: Quantizer, incompatible_keys) -> None:
    module._seeded = bool(module.initialised)
