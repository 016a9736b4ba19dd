"""Train the controller (frame t, frame t-1, real action -> the LAM's 7 x 5 code grid) by streaming
latent shards, then score it on the test split.

    python -m control.train --latent shards/latent --out checkpoints/controller [--steps 1500]

Writes `<out>/controller.pt` (format "lam-controller/1", atomic, weights_only-loadable),
`<out>/metrics.json` and `<out>/report.md`.

Scores (all per cell of the grid, over every cell of every test transition):
- `accuracy`: the controller's argmax code equals the LAM's code;
- `majority`: "predict the cell's most common code", the most common code of that cell over the
  training samples the controller saw (counted while training, so no second pass over the shards);
- `changed`: the same two on the *changed cells* only, the cells whose true code is not that most
  common code. In Breakout most cells hold the "nothing happens here" code nearly always, so the
  plain accuracy is high for any model; on changed cells the majority baseline scores 0 by
  construction and only predicting the action's and the ball's effect counts.
- `action_effect`: the fraction of test frames whose predicted grid differs between LEFT and RIGHT:
  0 means the controller ignores the action (and the play page cannot be steered).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from common.cli import add_config_flags, config_values, flag
from common.errors import UserError, check_output_dir, run_cli
from pipeline.shards import LATENT_FORMAT, atomic_write_bytes, atomic_write_json, load_manifest

from control.checkpoint import save_controller
from control.data import latent_identity, ordered_batches, training_batches
from control.network import ACTION_NAMES, LEFT, RIGHT, Controller, ControllerConfig

CHECKPOINT_NAME = "controller.pt"


@dataclass
class ControllerTrainConfig:
    latent: Path = flag(help="latent shard directory (lam-latent/1)")
    out: Path = Path("checkpoints/controller")
    steps: int = 1500
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 1e-4
    shuffle_buffer: int = 256           # samples mixed across episodes before batching
    seed: int = 0
    log_every: int = 50
    ckpt_every: int = 500               # the checkpoint is rewritten (atomically) this often and at the end
    eval_split: str = "test"
    eval_batch_size: int = 64
    use_prev: bool = True
    channels: tuple[int, ...] = (16, 32, 64, 96, 128)
    hidden: int = 192
    device: str = "cpu"
    threads: int = 0                    # torch CPU threads; 0 leaves torch's default

    def __post_init__(self):
        self.latent, self.out = Path(self.latent), Path(self.out)
        for name in ("steps", "batch_size", "shuffle_buffer", "log_every", "ckpt_every", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be at least 1 (got {getattr(self, name)})")
        if self.shuffle_buffer < self.batch_size:
            raise UserError(f"--shuffle-buffer ({self.shuffle_buffer}) must be at least --batch-size ({self.batch_size})")
        if self.lr <= 0:
            raise UserError(f"--lr must be > 0 (got {self.lr})")
        if self.eval_split not in ("train", "val", "test"):
            raise UserError(f"--eval-split must be train, val or test (got {self.eval_split!r})")
        if not self.latent.is_dir():
            raise UserError(f"{self.latent}: latent shard directory not found (run `make extract`)")
        check_output_dir(self.out, "--out")

    def to_dict(self) -> dict:
        values = asdict(self)
        values.update(latent=str(self.latent), out=str(self.out), channels=list(self.channels))
        return values


# ------------------------------------------------------------------------------------ training
def colour_mode(latent: Path) -> bool:
    """grayscale? The LAM that made the latents says (manifest `checkpoint.color`); the frames in the
    shards are RGB either way, so the controller sees what that LAM's decoder works in."""
    manifest = load_manifest(latent, LATENT_FORMAT)
    return manifest.get("checkpoint", {}).get("color", "gray") == "gray"


def train(config: ControllerTrainConfig, progress=print) -> dict:
    torch.manual_seed(config.seed)
    if config.threads:
        torch.set_num_threads(config.threads)
    device = torch.device(config.device)
    grayscale = colour_mode(config.latent)
    controller = Controller(ControllerConfig(in_channels=1 if grayscale else 3, use_prev=config.use_prev,
                                             channels=config.channels, hidden=config.hidden)).to(device)
    optimizer = torch.optim.AdamW(controller.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, config.steps, eta_min=config.lr * 0.1)
    code_counts = torch.zeros(7, 5, controller.config.codebook_size, dtype=torch.int64)
    batches = training_batches(config.latent, config.batch_size, grayscale=grayscale,
                               shuffle_buffer=config.shuffle_buffer, seed=config.seed)
    lam = latent_identity(config.latent)
    history, started, window = [], time.perf_counter(), []
    for step in range(1, config.steps + 1):
        controller.train()
        batch = next(batches)
        code_counts += F.one_hot(batch["codes"], controller.config.codebook_size).sum(0)
        logits = controller(batch["cur"].to(device), batch["action"].to(device), batch["prev"].to(device))
        loss = F.cross_entropy(logits, batch["codes"].to(device))
        if not torch.isfinite(loss):
            raise RuntimeError(f"step {step}: non-finite loss {loss.item()}; lower --lr")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        window.append(loss.item())
        if step % config.log_every == 0 or step == config.steps:
            history.append({"step": step, "loss": sum(window) / len(window)})
            progress(f"step {step}/{config.steps}  loss {history[-1]['loss']:.4f}  "
                     f"{step * config.batch_size / (time.perf_counter() - started):.0f} samples/s")
            window = []
        if step % config.ckpt_every == 0 and step != config.steps:
            save_controller(config.out / CHECKPOINT_NAME, controller, step=step, lam=lam,
                            train_config=config.to_dict())
    majority = code_counts.argmax(-1)                     # (7, 5): each cell's most common code
    metrics = {"training": {"steps": config.steps, "samples_seen": int(code_counts[0, 0].sum()),
                         "seconds": round(time.perf_counter() - started, 1), "loss": history},
               "lam": lam, "majority_codes": majority.tolist(),
               config.eval_split: evaluate(controller, config.latent, config.eval_split, code_counts, grayscale,
                                           config.eval_batch_size, device)}
    save_controller(config.out / CHECKPOINT_NAME, controller, step=config.steps, lam=lam,
                    train_config=config.to_dict(), metrics=metrics)
    return metrics


# ------------------------------------------------------------------------------------ scoring
@torch.no_grad()
def evaluate(controller: Controller, latent: Path, split: str, code_counts: torch.Tensor, grayscale: bool,
             batch_size: int, device: torch.device) -> dict:
    """Per-cell accuracy of the controller and of the majority code, over all cells and changed cells;
    cross-entropy of the controller and of each cell's code frequencies (smoothed by one pseudo-count
    spread over the codebook, so unseen codes are not infinitely unlikely), the best a predictor that
    looks at neither frame nor action can do."""
    controller.eval()
    majority = code_counts.argmax(-1)
    pseudo = 1.0 / code_counts.shape[-1]
    frequencies = (code_counts.double() + pseudo) / (code_counts.sum(-1, keepdim=True) + 1.0)
    log_frequencies = frequencies.log().to(device)            # (7, 5, 256)
    frequency_loss_sum = 0.0
    totals = {name: 0 for name in ("cells", "correct", "majority_correct", "changed", "changed_correct",
                                    "samples", "action_effect")}
    loss_sum = 0.0
    by_action = {name: {"changed": 0, "changed_correct": 0, "cells": 0, "correct": 0} for name in ACTION_NAMES}
    for batch in ordered_batches(latent, split, batch_size, grayscale=grayscale):
        cur, prev, action, target = (batch[k].to(device) for k in ("cur", "prev", "action", "codes"))
        logits = controller(cur, action, prev)
        loss_sum += float(F.cross_entropy(logits, target, reduction="sum"))
        cell_log_p = log_frequencies.unsqueeze(0).expand(len(target), -1, -1, -1)
        frequency_loss_sum -= float(cell_log_p.gather(-1, target.unsqueeze(-1)).sum())
        pred = logits.argmax(1)
        correct, changed = pred == target, target != majority.to(device)
        totals["cells"] += target.numel()
        totals["correct"] += int(correct.sum())
        totals["majority_correct"] += int((~changed).sum())
        totals["changed"] += int(changed.sum())
        totals["changed_correct"] += int((correct & changed).sum())
        totals["samples"] += len(target)
        left = controller(cur, torch.full_like(action, LEFT), prev).argmax(1)
        right = controller(cur, torch.full_like(action, RIGHT), prev).argmax(1)
        totals["action_effect"] += int((left != right).flatten(1).any(1).sum())
        for index, name in enumerate(ACTION_NAMES):
            rows = action == index
            by_action[name]["cells"] += int(rows.sum()) * 35
            by_action[name]["correct"] += int(correct[rows].sum())
            by_action[name]["changed"] += int(changed[rows].sum())
            by_action[name]["changed_correct"] += int((correct & changed)[rows].sum())
    if totals["samples"] == 0:
        raise UserError(f"{latent}: split {split!r} has no samples to score")
    ratio = lambda num, den: num / den if den else None  # noqa: E731
    return {"split": split, "transitions": totals["samples"], "cells": totals["cells"],
            "loss": loss_sum / totals["cells"], "frequency_loss": frequency_loss_sum / totals["cells"],
            "accuracy": ratio(totals["correct"], totals["cells"]),
            "majority_accuracy": ratio(totals["majority_correct"], totals["cells"]),
            "changed_fraction": ratio(totals["changed"], totals["cells"]),
            "changed_accuracy": ratio(totals["changed_correct"], totals["changed"]),
            "changed_majority_accuracy": 0.0 if totals["changed"] else None,
            "action_effect": ratio(totals["action_effect"], totals["samples"]),
            "by_action": {name: {"transitions": v["cells"] // 35, "accuracy": ratio(v["correct"], v["cells"]),
                                 "changed_accuracy": ratio(v["changed_correct"], v["changed"])}
                          for name, v in by_action.items()}}


def report_markdown(metrics: dict, split: str, checkpoint: Path) -> str:
    scores = metrics[split]
    pct = lambda value: "n/a" if value is None else f"{value:.1%}"  # noqa: E731
    beats = (scores["accuracy"] or 0) > (scores["majority_accuracy"] or 0)
    lines = [f"# Controller: frame t, t-1 and the real action -> the LAM's codes ({split} split)", "",
             f"Checkpoint `{checkpoint}`, {metrics['training']['steps']} steps, "
             f"LAM {metrics['lam'].get('sha256', '?')[:12]} (step {metrics['lam'].get('step', '?')}).", "",
             f"**The controller {'beats' if beats else 'does not beat'} predicting each cell's most common code**: "
             f"{pct(scores['accuracy'])} of cells right against {pct(scores['majority_accuracy'])}. "
             f"On the {pct(scores['changed_fraction'])} of cells whose code is not the cell's most common one "
             f"(the changed cells, where the majority guess scores 0) it gets {pct(scores['changed_accuracy'])}.",
             "", f"Changing the action from LEFT to RIGHT changes the predicted grid on {pct(scores['action_effect'])} "
             f"of {split} frames" + (" — the controller barely uses the action." if (scores["action_effect"] or 0) < 0.5
                                     else "."), "",
             "| | all cells | changed cells | cross-entropy (nats/cell) |", "|---|---|---|---|",
             f"| controller | {pct(scores['accuracy'])} | {pct(scores['changed_accuracy'])} | {scores['loss']:.4f} |",
             f"| most common code per cell (code frequencies for the cross-entropy) | "
             f"{pct(scores['majority_accuracy'])} | 0.0% | {scores['frequency_loss']:.4f} |", "",
             "| recorded action | transitions | all cells | changed cells |", "|---|---|---|---|"]
    for name, row in scores["by_action"].items():
        lines.append(f"| {name} | {row['transitions']} | {pct(row['accuracy'])} | {pct(row['changed_accuracy'])} |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------ cli
def parse_args(argv: Sequence[str] | None) -> ControllerTrainConfig:
    parser = argparse.ArgumentParser(description="Train the action -> latent code controller on latent shards.")
    add_config_flags(parser, ControllerTrainConfig)
    return ControllerTrainConfig(**config_values(parser.parse_args(argv), ControllerTrainConfig))


def run(argv: Sequence[str] | None = None) -> int:
    config = parse_args(argv)
    print("controller config: " + json.dumps(config.to_dict(), sort_keys=True))
    metrics = train(config)
    atomic_write_json(config.out / "metrics.json", metrics)
    checkpoint = config.out / CHECKPOINT_NAME
    atomic_write_bytes(config.out / "report.md", report_markdown(metrics, config.eval_split, checkpoint).encode())
    scores = metrics[config.eval_split]
    print(f"{config.eval_split}: per-cell accuracy {scores['accuracy']:.1%} (most common code {scores['majority_accuracy']:.1%}); "
          f"changed cells {scores['changed_accuracy'] or 0:.1%} of {scores['changed_fraction']:.1%}; "
          f"LEFT vs RIGHT changes the grid on {scores['action_effect']:.0%} of frames")
    print(f"checkpoint: {checkpoint}\nreport: {config.out / 'report.md'}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry; returns the exit code (a user's mistake: one `error:` line on stderr, 2)."""
    return run_cli(run, argv)


if __name__ == "__main__":
    sys.exit(main())
