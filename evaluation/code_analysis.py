"""What the latent codes say about the game: which grid cells' codes go with which gameplay event
(normalised mutual information). The action probes are in probes.py; the helpers they share
(one-hot codes, the visible-effect criterion) are here.

Visible effect: the paddle moved between t and t+1, or the ball came into play (FIRE launched it).
On the other transitions nothing on screen depends on the button (NOOP at rest, pushing into a
wall), so no model of frames could tell the action. The criterion comes from the recorder's labels
(paddle_x/next_paddle_x, ball_x/next_ball_x).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from evaluation.events import TransitionEvents

EVENT_KINDS = ("paddle", "bounce", "brick", "life_lost")


# ------------------------------------------------------------------------------------- events
def event_labels(events: Sequence[TransitionEvents]) -> dict[str, np.ndarray]:
    """Per event kind, one label per transition: paddle left/none/right, the others yes/no."""
    return {"paddle": np.array([e.paddle for e in events]),
            "bounce": np.array([e.ball_bounced for e in events]),
            "brick": np.array([e.bricks_broken > 0 for e in events]),
            "life_lost": np.array([e.life_lost for e in events])}


def cell_nmi(codes: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """NMI between the event label and the code at each grid cell: float (7, 5) in [0, 1]."""
    n, rows, cols = codes.shape
    if len(set(labels.tolist())) < 2:
        return np.zeros((rows, cols))
    from sklearn.metrics import normalized_mutual_info_score

    return np.array([[normalized_mutual_info_score(labels, codes[:, r, c]) for c in range(cols)]
                     for r in range(rows)])


def event_code_analysis(codes: np.ndarray, events: Sequence[TransitionEvents]) -> dict:
    """For each event kind: how many transitions show it, NMI per cell, the best cell, and the codes
    at that cell most over-represented when the event happens (lift = P(code | event) / P(code))."""
    out = {}
    for kind, labels in event_labels(events).items():
        nmi = cell_nmi(codes, labels)
        best = np.unravel_index(int(np.argmax(nmi)), nmi.shape)
        positive = labels != "none" if kind == "paddle" else labels.astype(bool)
        out[kind] = {"transitions": int(positive.sum()), "nmi_cells": nmi.round(4).tolist(),
                     "nmi_max": float(nmi.max()), "nmi_mean": float(nmi.mean()),
                     "best_cell": [int(best[0]), int(best[1])],
                     "top_codes": enriched_codes(codes[:, best[0], best[1]], positive)}
    return out


def enriched_codes(cell_codes: np.ndarray, positive: np.ndarray, top: int = 5, min_count: int = 3) -> list[dict]:
    """Codes at one cell seen at least `min_count` times with the event, by lift, highest first."""
    if not positive.any():
        return []
    overall = np.bincount(cell_codes, minlength=256) / len(cell_codes)
    with_event = np.bincount(cell_codes[positive], minlength=256)
    rows = [{"code": int(code), "count": int(with_event[code]),
             "lift": float(with_event[code] / positive.sum() / overall[code])}
            for code in np.flatnonzero(with_event >= min_count)]
    return sorted(rows, key=lambda row: -row["lift"])[:top]


# ------------------------------------------------------------------------------------- actions
def visible_effect(meta: dict) -> bool:
    """The action could be seen: paddle moved, or the ball was launched (see module docstring)."""
    moved = meta.get("paddle_x") is not None and meta.get("next_paddle_x") != meta.get("paddle_x")
    launched = meta.get("ball_x") is None and meta.get("next_ball_x") is not None
    return bool(moved or launched)


def one_hot_codes(codes: np.ndarray, codebook_size: int) -> "scipy.sparse.csr_matrix":
    """(n, 7, 5) codes -> sparse (n, 35 * codebook_size): cell i holding code k sets column i*K + k."""
    n = codes.shape[0]
    flat = codes.reshape(n, -1).astype(np.int64)
    columns = flat + np.arange(flat.shape[1]) * codebook_size
    rows = np.repeat(np.arange(n), flat.shape[1])
    import scipy.sparse

    return scipy.sparse.csr_matrix((np.ones(rows.size, np.float32), (rows, columns.ravel())),
                                   shape=(n, flat.shape[1] * codebook_size))
