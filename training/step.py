"""One optimiser step (micro-batches, loss scaling, finite check, clipping, update) and the
learning-rate schedule."""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Iterator

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from common.errors import UserError
from model.networks import fold_layouts_when_compiled
from training.config import TrainConfig
from training.runtime import Runtime, all_sum

LOSS_TERMS = ("loss", "recon", "commitment", "codebook", "entropy", "action", "motion")


# ------------------------------------------------------------------------------------ schedule
def schedule_horizon(cfg: TrainConfig) -> int:
    """The step the schedule plans for: lr reaches lr_min there and code resets stop one interval
    before. It does not follow --iters (unless lr_decay_iters is 0), so a run stopped at step k and
    resumed to n is the same run as one straight to n."""
    return cfg.lr_decay_iters or cfg.iters


def learning_rate(cfg: TrainConfig, step: int) -> float:
    """lr for update number `step` + 1: linear warmup, then cosine (or linear) decay from lr to lr_min
    over the schedule horizon, lr_min after."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = min(1.0, (step - cfg.warmup) / max(1, schedule_horizon(cfg) - cfg.warmup))
    if cfg.lr_schedule == "constant":
        return cfg.lr
    if cfg.lr_schedule == "linear":
        return cfg.lr - (cfg.lr - cfg.lr_min) * progress
    return cfg.lr_min + 0.5 * (cfg.lr - cfg.lr_min) * (1 + math.cos(math.pi * progress))


def every(step: int, interval: int) -> bool:
    return interval > 0 and step % interval == 0


# ------------------------------------------------------------------------------------ the step
@dataclass
class StepOutcome:
    terms: dict[str, float]           # loss terms, averaged over the micro-batches
    grad_norm: float
    skipped: str | None = None        # why the update was not applied (non-finite), else None
    loss_scale: float | None = None   # fp16: the GradScaler's scale this update was taken at
    overflowed: bool = False          # fp16: the GradScaler found inf/NaN gradients and skipped the update


class TrainStep:
    """Forward + backward over `grad_accum` micro-batches, then one update. The model may be wrapped
    for DDP and compiled here; `model` itself stays the plain module (checkpoints, validation)."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, rt: Runtime, *,
                 grad_accum: int = 1, grad_clip: float = 0.0, max_nonfinite: int = 5, compile: bool = False,
                 compile_backend: str = "inductor", compile_mode: str = "default", action_labels=None,
                 own_frames=None, jitter_until: int | None = None):
        self.model, self.optimizer, self.rt = model, optimizer, rt
        self.action_labels = action_labels       # training.labels.ActionLabels, or None: no supervision
        self.own_frames = own_frames             # training.own_frames.OwnFrames, or None: recorded frames only
        self.jitter_until = jitter_until         # the first update whose encoder sees the pairs unmoved, or None
        self.grad_accum, self.grad_clip, self.max_nonfinite = grad_accum, grad_clip, max_nonfinite
        self.scaler = torch.amp.GradScaler(rt.device.type, enabled=rt.uses_scaler)
        self.nonfinite_in_a_row = 0
        self.overflow_skips = 0           # updates the GradScaler skipped (they still count as steps)
        self._saved_buffers: list[torch.Tensor] | None = None     # _snapshot's copies, reused every step
        # Compiled first, then wrapped (as torchtitan does): dynamo then traces the model alone, in one
        # graph, instead of breaking at DDP's own Python forward.
        # The model's convolutions are layout-owning operators under compile (model/conv.py says why).
        if compile:
            fold_layouts_when_compiled()
        compiled = (torch.compile(model, backend=compile_backend,
                                  mode=None if compile_mode == "default" or compile_backend != "inductor" else compile_mode)
                    if compile else model)
        # DDP buffers are not broadcast: quantiser statistics are synchronised by the quantiser itself,
        # BatchNorm statistics by averaging (average_batchnorm_stats) or, if asked, SyncBatchNorm.
        self.step_model = DDP(compiled, device_ids=[rt.local_rank] if rt.device.type == "cuda" else None,
                              broadcast_buffers=False) if rt.distributed else compiled

    def __call__(self, batches: Iterator[dict], lr: float, step: int) -> StepOutcome:
        """Update number `step` + 1 at learning rate `lr`, drawing micro-batches from `batches`.
        A non-finite loss or gradient skips the update and leaves no trace in the model (its
        buffers and the RNG are put back); `max_nonfinite` in a row stop the run."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        if self.jitter_until is not None:        # from the step alone, so a resumed run does the same
            self.model.encoder.jitter = 0 if step >= self.jitter_until else self.model.config.encoder_jitter
        before = self._snapshot()
        sums: torch.Tensor | None = None         # the loss terms, summed on the device over the micro-batches
        keys: list[str] = []
        for micro in range(self.grad_accum):
            batch = next(batches)
            keys += batch.get("key", [])
            sync = micro == self.grad_accum - 1 or not self.rt.distributed
            with (contextlib.nullcontext() if sync else self.step_model.no_sync()), self.rt.autocast():
                action = self.action_labels(batch["key"], batch["cur"].device) if self.action_labels else None
                start = self.own_frames(self.model, batch, step) if self.own_frames else None
                out = self.step_model(batch["cur"], batch["next"], batch.get("prev"), action, start)
            self.scaler.scale(out["loss"] / self.grad_accum).backward()
            terms_now = torch.stack([out[name].detach().float() for name in LOSS_TERMS])
            sums = terms_now if sums is None else sums + terms_now
        self.scaler.unscale_(self.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip or math.inf)
        # the step's one read-back to the host (a GPU waits for nothing else): the terms and the norm
        *values, grad_norm = torch.cat([sums / self.grad_accum, grad_norm.detach().float().reshape(1)]).tolist()
        terms = dict(zip(LOSS_TERMS, values))
        loss_finite = all_sum([float(math.isfinite(terms["loss"]))], self.rt)[0] == self.rt.world_size
        if not (loss_finite and (self.rt.uses_scaler or math.isfinite(grad_norm))):
            self._restore(before)
            return StepOutcome(terms, grad_norm, self._skip(terms, grad_norm, step, keys))
        scale = self.scaler.get_scale() if self.scaler.is_enabled() else None
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.nonfinite_in_a_row = 0
        # update() lowers the scale exactly when step() found inf/NaN gradients and skipped the update
        overflowed = scale is not None and self.scaler.get_scale() < scale
        self.overflow_skips += overflowed
        return StepOutcome(terms, grad_norm, loss_scale=scale, overflowed=overflowed)

    def _snapshot(self) -> dict:
        """What a forward pass changes besides the gradients: BatchNorm running statistics, the
        quantiser's usage counts and recent outputs (and, on the first step, the codebook it seeds
        from the batch), and the RNG the seeding draws from."""
        buffers = [b.detach() for _, b in self.model.named_buffers()]
        if self._saved_buffers is None:
            self._saved_buffers = [torch.empty_like(b) for b in buffers]
        if buffers:
            torch._foreach_copy_(self._saved_buffers, buffers)      # one launch for all, not one per buffer
        return {"buffers": self._saved_buffers,
                "quantizer": self.model.quantizer.forward_state(),
                "rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state_all() if self.rt.device.type == "cuda" else None}

    @torch.no_grad()
    def _restore(self, before: dict) -> None:
        for buffer, saved in zip(self.model.named_buffers(), before["buffers"]):
            buffer[1].copy_(saved)
        self.model.quantizer.restore_forward_state(before["quantizer"])
        torch.set_rng_state(before["rng"])
        if before["cuda_rng"] is not None:
            torch.cuda.set_rng_state_all(before["cuda_rng"])

    def _skip(self, terms: dict[str, float], grad_norm: float, step: int, keys: list[str]) -> str:
        """Drop this step's gradients; the step is not counted. The GradScaler's protocol is kept
        (unscale_ was called, so update() must follow before the next unscale_): the scale backs
        off as for an overflow. Stops the run when it keeps happening."""
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler.is_enabled():
            self.scaler.update(self.scaler.get_scale() * self.scaler.get_backoff_factor())
        self.nonfinite_in_a_row += 1
        what = "loss" if not math.isfinite(terms["loss"]) else "gradient"
        shown = ", ".join(keys[:8]) + (f" and {len(keys) - 8} more" if len(keys) > 8 else "")
        message = (f"non-finite {what} at step {step + 1} (loss {terms['loss']}, grad norm {grad_norm}; "
                   f"batch {shown or 'without keys'}); "
                   f"update skipped ({self.nonfinite_in_a_row}/{self.max_nonfinite} in a row)")
        if self.nonfinite_in_a_row >= self.max_nonfinite:
            raise UserError(f"{message}: stopping; try a lower lr, --amp off or grad_clip")
        return message
