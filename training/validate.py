"""Validation during training: reconstruction loss, PSNR/SSIM beside copying frame t, codebook use,
drawing (paddle and ball within 2 px), the move probe and the selection score best.pt is chosen by,
and example reconstructions, each on its own cadence. The numbers come from
evaluation.metrics, the same code evaluate.py reports with."""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from evaluation.events import detect_elements
from evaluation.examples import Example
from evaluation.metrics import ReconstructionMeter, codebook_stats
from evaluation.probes import linear_codes_probe, move_label
from model import LatentActionModel
from model.inference import codes_to_array
from pipeline.loader import LoaderConfig, open_loader
from pipeline.pair_set import PairSet
from pipeline.shards import read_members
from training.config import TrainConfig
from training.runtime import Runtime, all_gather, all_sum, average_batchnorm_stats
from training.step import every

EXAMPLES = 4                   # pairs in the logged reconstruction image
TOLERANCE_PX = 2               # the report's "within 2 px" (evaluation.metrics.ElementMeter)


@dataclass
class Due:
    """What a step's validation pass reports."""

    loss: bool = False         # val/recon, which picks best.pt
    metrics: bool = False      # PSNR, SSIM, codebook use
    histogram: bool = False
    images: bool = False

    def __bool__(self) -> bool:
        return self.loss or self.metrics or self.histogram or self.images


@dataclass
class Validation:
    """A validation pass's results, each for its own channel of the log: the scalars go in the step's
    row; code use (for the histogram) and the example reconstructions are there when due."""

    scalars: dict = field(default_factory=dict)
    code_counts: np.ndarray | None = None        # (codebook_size,) uses of each code
    examples: list[Example] | None = None


class DrawingMeter:
    """Does the prediction draw the paddle and the ball where the true frame t+1 has them (within
    2 px, the report's measure; evaluation/events.py finds them)? Counts summed over DDP ranks."""

    def __init__(self):
        self.counts = [0, 0, 0, 0]              # paddle hits, paddles, ball hits, balls

    def update(self, pred: torch.Tensor, nxt: torch.Tensor) -> None:
        for drawn, truth in zip(pred.cpu(), nxt.cpu()):
            drawn, truth = detect_elements(drawn), detect_elements(truth)
            if truth.paddle_x is not None:
                self.counts[0] += drawn.paddle_x is not None and abs(drawn.paddle_x - truth.paddle_x) <= TOLERANCE_PX
                self.counts[1] += 1
            if truth.ball is not None:
                self.counts[2] += drawn.ball is not None and math.dist(drawn.ball, truth.ball) <= TOLERANCE_PX
                self.counts[3] += 1

    def compute(self, rt: Runtime) -> dict:
        paddle_hits, paddles, ball_hits, balls = all_sum(self.counts, rt)
        return {"val/paddle_within_2px": paddle_hits / paddles if paddles else None,
                "val/ball_within_2px": ball_hits / balls if balls else None}


def selection_score(row: dict) -> float | None:
    """What best.pt maximises (TrainConfig.best_by = "selection"): the mean of the paddle and the
    ball drawn within 2 px and the codes' move probe on the validation sample, those that were
    measured. Reconstruction alone picked models that erase what moves (a blank where the paddle
    was costs less than a paddle 10 px off), and the probe drifts down while PSNR rises."""
    parts = [row.get(name) for name in ("val/paddle_within_2px", "val/ball_within_2px", "val/move_probe_codes")]
    parts = [value for value in parts if value is not None]
    return sum(parts) / len(parts) if parts else None


class MoveProbe:
    """Are the codes becoming actions? A linear probe on one-hot codes, fitted on a fixed sample of
    train pairs and scored on the validation sample, predicting the paddle's move from the labels
    (evaluation/probes.py; evaluate.py reports the full set of probes)."""

    def __init__(self, loader, metas: dict[str, dict]):
        self.loader, self.metas = loader, metas

    @classmethod
    def build(cls, cfg: TrainConfig, rt: Runtime, data: PairSet, loading: LoaderConfig) -> "MoveProbe | None":
        """On `data`'s train pairs, walked in order by a loader like `loading` (the run's own)."""
        if not cfg.probe_pairs:
            return None
        metas = {key: json.loads(m["json"]) for split in ("train", "val")
                 for key, m in read_members(data.shards(split), ("json",)).items()}
        if not any(move_label(meta) is not None for meta in metas.values()):
            return None                                   # no labels: nothing to probe
        loader = open_loader(data, "train", dataclasses.replace(loading, shuffle=False, drop_last=False,
                                                                 sample=cfg.probe_pairs))
        return cls(loader, metas)

    def labelled(self, codes: list[np.ndarray], keys: list[str], rt: Runtime) -> tuple[np.ndarray, np.ndarray]:
        """Every rank's (codes, move labels) of the labelled pairs."""
        gathered = all_gather((np.concatenate(codes), keys), rt)
        codes = np.concatenate([c for c, _ in gathered])
        labels = np.array([move_label(self.metas[k]) if move_label(self.metas[k]) is not None else -1
                           for _, ks in gathered for k in ks])
        return codes[labels >= 0], labels[labels >= 0]

    def score(self, model: LatentActionModel, val_codes: list[np.ndarray], val_keys: list[str], rt: Runtime) -> dict:
        train_codes, train_keys = [], []
        for batch in self.loader:
            with rt.autocast():
                train_codes.append(codes_to_array(model.encode(batch["cur"], batch["next"], batch.get("prev")),
                                                  model.config.codebook_size))
            train_keys += batch["key"]
        x_train, y_train = self.labelled(train_codes, train_keys, rt)
        x_val, y_val = self.labelled(val_codes, val_keys, rt)
        if not len(y_val):
            return {}
        values, counts = np.unique(y_train, return_counts=True)
        accuracy = linear_codes_probe(x_train, y_train, x_val, y_val, model.config.codebook_size)
        return {"val/move_probe_codes": accuracy, "val/move_probe_majority": float((y_val == values[counts.argmax()]).mean())}


class Validator:
    def __init__(self, model: LatentActionModel, loader, cfg: TrainConfig, rt: Runtime, probe: MoveProbe | None = None):
        self.model, self.loader, self.cfg, self.rt, self.probe = model, loader, cfg, rt, probe
        self.pairs, self.episodes = loader.coverage

    def describe(self) -> str:
        return f"validation: a fixed sample of {self.pairs} pairs from {self.episodes} episodes"

    def due(self, step: int, last: bool = False) -> Due:
        cfg = self.cfg
        return Due(every(step, cfg.val_every) or last, every(step, cfg.metrics_every) or last,
                   every(step, cfg.hist_every) or last, every(step, cfg.image_every) or last)

    def __call__(self, step: int, last: bool = False) -> Validation:
        """What is due at `step` (nothing, most steps); collective under DDP: every rank calls it."""
        due = self.due(step, last)
        return self.run(due) if due else Validation()

    @torch.no_grad()
    def run(self, due: Due) -> Validation:
        """One pass over the validation sample (each rank its share, summed across ranks). SSIM, the
        costly metric, only when the metrics are due."""
        average_batchnorm_stats(self.model, self.rt)
        self.model.eval()
        model_meter = ReconstructionMeter(self.rt.device, ssim=due.metrics)
        copy_meter = ReconstructionMeter(self.rt.device, ssim=False)
        counts = torch.zeros(self.model.config.codebook_size, dtype=torch.float64, device=self.rt.device)
        examples, frames, loss_sum, codes, keys = [], 0, 0.0, [], []
        drawing = DrawingMeter()
        for batch in self.loader:
            cur, nxt = batch["cur"], batch["next"]
            with self.rt.autocast():
                out = self.model(cur, nxt, batch.get("prev"))
            pred = out["pred"].float().clamp(0, 1)
            model_meter.update(pred, nxt, cur)
            copy_meter.update(cur, nxt, cur)
            if due.metrics:
                drawing.update(pred, nxt)
            loss_sum += float(out["loss"]) * nxt.shape[0]
            counts += torch.bincount(out["codes"].reshape(-1), minlength=counts.numel()).double()
            codes.append(codes_to_array(out["codes"], self.model.config.codebook_size))
            keys += batch["key"]
            frames += nxt.shape[0]
            if not examples:
                shown = (x[:EXAMPLES].float().cpu().numpy() for x in (cur, nxt, pred))
                examples = [Example.of(*example) for example in zip(batch["key"][:EXAMPLES], *shown)]
        self.model.train()
        frames_all, loss_sum = all_sum([frames, loss_sum], self.rt)
        if frames_all == 0:
            return Validation()
        if self.rt.distributed:
            dist.all_reduce(counts)
        scores, copy = model_meter.compute(), copy_meter.compute()
        codebook = codebook_stats(counts.long().cpu().numpy())
        row = {"val/recon": scores["l2"], "val/loss": loss_sum / frames_all,
               "val/pairs": self.pairs, "val/episodes": self.episodes}
        if due.metrics:
            row.update({"val/psnr": scores["psnr"], "val/psnr_copy": copy["psnr"], "val/ssim": scores["ssim"],
                        "codebook/used_fraction": codebook["used_fraction"],
                        "codebook/perplexity": codebook["perplexity"], **drawing.compute(self.rt)})
            if self.probe is not None:
                self.model.eval()
                row.update(self.probe.score(self.model, codes, keys, self.rt))
                self.model.train()
            row["val/selection"] = selection_score(row)
        return Validation(row, np.asarray(codebook["counts"]) if due.histogram else None,
                          examples if due.images else None)
