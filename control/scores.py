"""How good the controller is on a split. Scores, all per cell of the grid over every cell of every
transition (a LAM's per-frame action code counts as a grid of one cell):
- `accuracy`: the controller's argmax code equals the LAM's code;
- `majority`: "predict the cell's most common code", the most common code of that cell over the
  training samples the controller saw (counted while training, so no second pass over the shards);
- `changed`: the same two on the *changed cells* only, the cells whose true code is not that most
  common code. In Breakout most cells hold the "nothing happens here" code nearly always, so the
  plain accuracy is high for any model; on changed cells the majority baseline scores 0 by
  construction and only predicting the action's and the ball's effect counts.
- `action_effect`: the fraction of frames whose predicted grid differs between LEFT and RIGHT:
  0 means the controller ignores the action (and the play page cannot be steered).
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from common.errors import UserError
from pipeline.actions import ACTION_NAMES, LEFT, RIGHT

from control.data import ordered_batches, targets
from control.network import Controller


@torch.no_grad()
def score_controller(controller: Controller, latent: Path, split: str, code_counts: torch.Tensor, grayscale: bool,
                     batch_size: int, device: torch.device) -> dict:
    """Per-cell accuracy of the controller and of the majority code, over all cells and changed cells;
    cross-entropy of the controller and of each cell's code frequencies (smoothed by one pseudo-count
    spread over the codebook, so unseen codes are not infinitely unlikely), the best a predictor that
    looks at neither frame nor action can do."""
    controller.eval()
    majority = code_counts.argmax(-1)
    pseudo = 1.0 / code_counts.shape[-1]
    frequencies = (code_counts.double() + pseudo) / (code_counts.sum(-1, keepdim=True) + 1.0)
    log_frequencies = frequencies.log().to(device)            # (7, 5, K), or (1, 1, K) for an action code
    frequency_loss_sum = 0.0
    totals = {name: 0 for name in ("cells", "correct", "majority_correct", "changed", "changed_correct",
                                    "samples", "action_effect")}
    loss_sum = 0.0
    by_action = {name: {"changed": 0, "changed_correct": 0, "cells": 0, "correct": 0} for name in ACTION_NAMES}
    cells = controller.cells[0] * controller.cells[1]
    for batch in ordered_batches(latent, split, batch_size, grayscale=grayscale):
        cur, prev, action = (batch[k].to(device) for k in ("cur", "prev", "action"))
        target = targets(batch, controller.config.target).to(device)
        before = targets(batch, controller.config.target, before=True).to(device)
        logits = controller.cell_logits(cur, action, prev, before)
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
        left = controller.cell_logits(cur, torch.full_like(action, LEFT), prev, before).argmax(1)
        right = controller.cell_logits(cur, torch.full_like(action, RIGHT), prev, before).argmax(1)
        totals["action_effect"] += int((left != right).flatten(1).any(1).sum())
        for index, name in enumerate(ACTION_NAMES):
            rows = action == index
            by_action[name]["cells"] += int(rows.sum()) * cells
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
            "by_action": {name: {"transitions": v["cells"] // cells, "accuracy": ratio(v["correct"], v["cells"]),
                                 "changed_accuracy": ratio(v["changed_correct"], v["changed"])}
                          for name, v in by_action.items()}}
