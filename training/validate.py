"""Validation during training: reconstruction loss (for best.pt), PSNR/SSIM beside copying frame t,
codebook use, and example reconstructions, each on its own cadence. The numbers come from
evaluation.metrics, the same code evaluate.py reports with."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from evaluation.figures import Example
from evaluation.metrics import ReconstructionMeter, codebook_stats
from model import LatentActionModel
from training.config import TrainConfig
from training.runtime import Runtime, all_sum, average_batchnorm_stats
from training.step import every

EXAMPLES = 4                   # pairs in the logged reconstruction image


@dataclass
class Due:
    """What a step's validation pass reports."""

    loss: bool = False         # val/recon, which picks best.pt
    metrics: bool = False      # PSNR, SSIM, codebook use
    histogram: bool = False
    images: bool = False

    def __bool__(self) -> bool:
        return self.loss or self.metrics or self.histogram or self.images


class Validator:
    def __init__(self, model: LatentActionModel, loader, cfg: TrainConfig, rt: Runtime):
        self.model, self.loader, self.cfg, self.rt = model, loader, cfg, rt
        self.pairs, self.episodes = loader.coverage

    def describe(self) -> str:
        return f"validation: a fixed sample of {self.pairs} pairs from {self.episodes} episodes"

    def due(self, step: int, last: bool = False) -> Due:
        cfg = self.cfg
        return Due(every(step, cfg.val_every) or last, every(step, cfg.metrics_every) or last,
                   every(step, cfg.hist_every) or last, every(step, cfg.image_every) or last)

    @torch.no_grad()
    def run(self, due: Due) -> dict:
        """One pass over the validation sample (each rank its share, summed across ranks) -> logged
        values (`_counts` and `_examples` for the logger's histogram and image when due)."""
        average_batchnorm_stats(self.model, self.rt)
        self.model.eval()
        model_meter, copy_meter = ReconstructionMeter(self.rt.device), ReconstructionMeter(self.rt.device, ssim=False)
        counts = torch.zeros(self.model.config.codebook_size, dtype=torch.float64, device=self.rt.device)
        examples, frames, loss_sum = [], 0, 0.0
        for batch in self.loader:
            cur, nxt = batch["cur"], batch["next"]
            with self.rt.autocast():
                out = self.model(cur, nxt)
            pred = out["pred"].float().clamp(0, 1)
            model_meter.update(pred, nxt, cur)
            copy_meter.update(cur, nxt, cur)
            loss_sum += float(out["loss"]) * nxt.shape[0]
            counts += torch.bincount(out["codes"].reshape(-1), minlength=counts.numel()).double()
            frames += nxt.shape[0]
            if not examples:
                examples = [Example.of(str(k), c, n, p) for k, c, n, p in
                            zip(range(EXAMPLES), *(x[:EXAMPLES].float().cpu().numpy() for x in (cur, nxt, pred)))]
        self.model.train()
        frames_all, loss_sum = all_sum([frames, loss_sum], self.rt)
        if frames_all == 0:
            return {}
        if self.rt.distributed:
            dist.all_reduce(counts)
        scores, copy = model_meter.compute(), copy_meter.compute()
        codebook = codebook_stats(counts.long().cpu().numpy())
        row: dict = {"val/recon": scores["l2"], "val/loss": loss_sum / frames_all,
                     "val/pairs": self.pairs, "val/episodes": self.episodes}
        if due.metrics:
            row.update({"val/psnr": scores["psnr"], "val/psnr_copy": copy["psnr"], "val/ssim": scores["ssim"],
                        "codebook/used_fraction": codebook["used_fraction"],
                        "codebook/perplexity": codebook["perplexity"]})
        if due.histogram:
            row["_counts"] = np.asarray(codebook["counts"])
        if due.images:
            row["_examples"] = examples
        return row
