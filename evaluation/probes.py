"""Do the codes carry the action? Probes fitted on the train split's pairs, scored on another split.

Three targets (DESIGN, "Evaluation"):
- `move`: the paddle's effective move between t and t+1, left / none / right, from the recorder's
  labels (paddle_x -> next_paddle_x). Every pair whose paddle is labelled in both frames counts.
- `move_bins`: how far it moved, in five bins (MOVE_BINS, px): a decoder can draw the paddle where
  it went only if the codes name the displacement, not just its sign.
- `action`: the recorded action, on the pairs where it had a visible effect (the paddle moved or the
  ball was launched; elsewhere nothing on screen depends on the button).

Five predictors each: a linear probe on one-hot codes (35 cells x K), an MLP on the code vectors,
an MLP on frame t alone (what the scene gives away: the recording policies aim at the ball), an MLP
on the pooled pixel difference t+1 - t (the ceiling: what is visible), and the majority class.
"The codes carry the action" needs codes_* near pixel_diff and well above frame_t.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from evaluation.code_analysis import one_hot_codes, visible_effect

MOVES = ("left", "none", "right")
# The paddle accelerates (0 to 24 px a step): far left, left, still (within 3 px), right, far right.
MOVE_BINS = (("<=-16", -16), ("-15..-4", -4), ("-3..3", 3), ("4..15", 15), (">=16", None))
FEATURE_POOL = 10              # frames average-pooled 10 x 10 (21 x 16 cells) for the pixel probes


def pooled(frames: torch.Tensor) -> np.ndarray:
    """(B, C, 210, 160) -> (B, C * 21 * 16), average-pooled."""
    return F.avg_pool2d(frames.float(), FEATURE_POOL).flatten(1).cpu().numpy()


@dataclass
class ProbeSet:
    """Pairs for the probes: codes (n, 7, 5), pooled frame t and t+1 - t (n, f), and their labels."""

    codes: np.ndarray
    frame: np.ndarray
    diff: np.ndarray
    metas: list[dict]

    @classmethod
    def collect(cls, batches) -> "ProbeSet":
        """From (codes, cur, next, metas) batches."""
        codes, frame, diff, metas = [], [], [], []
        for batch_codes, cur, nxt, batch_metas in batches:
            codes.append(np.asarray(batch_codes))
            frame.append(pooled(cur))
            diff.append(pooled(nxt.float() - cur.float()))
            metas += batch_metas
        return cls(np.concatenate(codes), np.concatenate(frame), np.concatenate(diff), metas)


def move_label(meta: dict) -> int | None:
    """0 left, 1 none, 2 right; None without paddle labels in both frames."""
    x, nx = meta.get("paddle_x"), meta.get("next_paddle_x")
    if x is None or nx is None:
        return None
    return int(np.sign(nx - x)) + 1


def move_bin_label(meta: dict) -> int | None:
    """Index into MOVE_BINS of the paddle's displacement; None without paddle labels in both frames."""
    x, nx = meta.get("paddle_x"), meta.get("next_paddle_x")
    if x is None or nx is None:
        return None
    return next(i for i, (_, upper) in enumerate(MOVE_BINS) if upper is None or nx - x <= upper)


def action_label(meta: dict) -> int | None:
    return int(meta["action"]) if "action" in meta and visible_effect(meta) else None


def _fit_and_score(model, x_train, y_train, x_test, y_test) -> float | None:
    if len(set(y_train.tolist())) < 2:
        return None                      # one class only: nothing to learn
    # sklearn where a probe is fitted, not where its labels are read (the trainer imports this)
    from sklearn.exceptions import ConvergenceWarning
    from threadpoolctl import threadpool_limits

    # one BLAS thread: for problems this small, threads only wait on each other on a busy box
    with warnings.catch_warnings(), threadpool_limits(1):
        warnings.simplefilter("ignore", ConvergenceWarning)
        model.fit(x_train, y_train)
    return float((model.predict(x_test) == y_test).mean())


def mlp(seed: int):
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), MLPClassifier(hidden_layer_sizes=(128,), alpha=1e-3, max_iter=300,
                                                         random_state=seed))


def linear_codes_probe(train_codes: np.ndarray, y_train: np.ndarray, test_codes: np.ndarray, y_test: np.ndarray,
                       codebook_size: int, seed: int = 0) -> float | None:
    """Logistic regression on one-hot codes: the probe the trainer's validation also logs."""
    from sklearn.linear_model import LogisticRegression

    return _fit_and_score(LogisticRegression(max_iter=300, C=1.0, random_state=seed),
                          one_hot_codes(train_codes, codebook_size), y_train,
                          one_hot_codes(test_codes, codebook_size), y_test)


def fit_jobs(train: ProbeSet, test: ProbeSet, label, codebook: np.ndarray, seed: int) -> tuple[list, dict] | None:
    """The fits that score every predictor of `label(meta)` (fitted on `train`, scored on `test`), as
    (name, model, x_train, y_train, x_test, y_test) jobs, and the rest of the result; None without
    labelled pairs."""
    y_train, y_test = (np.array([label(m) if label(m) is not None else -1 for m in s.metas]) for s in (train, test))
    fit, held = y_train >= 0, y_test >= 0
    if not fit.any() or not held.any():
        return None
    y_train, y_test = y_train[fit], y_test[held]
    vectors = lambda s, keep: codebook[s.codes[keep].astype(np.int64)].reshape(int(keep.sum()), -1)  # noqa: E731
    size = len(codebook)
    from sklearn.linear_model import LogisticRegression

    jobs = [("codes_linear", LogisticRegression(max_iter=300, C=1.0, random_state=seed),
             one_hot_codes(train.codes[fit], size), y_train, one_hot_codes(test.codes[held], size), y_test),
            ("codes_mlp", mlp(seed), vectors(train, fit), y_train, vectors(test, held), y_test),
            ("frame_t", mlp(seed), train.frame[fit], y_train, test.frame[held], y_test),
            ("pixel_diff", mlp(seed), train.diff[fit], y_train, test.diff[held], y_test)]
    values, counts = np.unique(y_train, return_counts=True)
    majority = int(values[np.argmax(counts)])
    rest = {"majority": float((y_test == majority).mean()), "majority_class": majority,
            "transitions": int(held.sum()), "train_transitions": int(fit.sum()),
            "classes": dict(zip(*np.unique(y_test, return_counts=True)))}
    return jobs, rest


# A pool of fitting processes takes about 2.5 s to start (each imports scikit-learn), so it pays only
# from a few hundred train pairs on: on the 2-core CPU, the 12 fits of 192 pairs took 2.6 s here and
# 4.0 s in two processes; of 1,500 pairs (the default probe_limit) 35 s here and 23 s in two.
POOL_FROM_PAIRS = 500


def run_fits(jobs: list, workers: int) -> list[float | None]:
    """Each (name, model, x_train, y_train, x_test, y_test) job's score, in order. The fits are
    independent and each runs on one thread (_fit_and_score), so they run side by side in `workers`
    processes: the same scores (every model has its own random_state) in a fraction of the time where
    there are cores (the probes were half of an evaluation's time on a CPU, and all of its tail on a
    GPU box)."""
    if workers <= 1 or len(jobs) <= 1 or max(len(job[3]) for job in jobs) < POOL_FROM_PAIRS:
        return [_fit_and_score(*job[1:]) for job in jobs]
    from joblib import Parallel, delayed

    return Parallel(n_jobs=min(workers, len(jobs)))(delayed(_fit_and_score)(*job[1:]) for job in jobs)


def score(train: ProbeSet, test: ProbeSet, label, codebook: np.ndarray, names: dict[int, str], seed: int) -> dict | None:
    """Every predictor of `label(meta)` fitted on `train`, scored on `test` (None: no labelled pairs)."""
    planned = fit_jobs(train, test, label, codebook, seed)
    if planned is None:
        return None
    jobs, rest = planned
    return finished(jobs, run_fits(jobs, 1), rest, names)


def finished(jobs: list, scores: list, rest: dict, names: dict[int, str]) -> dict:
    return {**{job[0]: value for job, value in zip(jobs, scores)},
            "majority": rest["majority"], "majority_class": names.get(rest["majority_class"], str(rest["majority_class"])),
            "transitions": rest["transitions"], "train_transitions": rest["train_transitions"],
            "classes": {names.get(int(v), str(v)): int(c) for v, c in rest["classes"].items()}}


def action_probes(train: ProbeSet, test: ProbeSet, codebook: np.ndarray, seed: int = 0, workers: int = 1) -> dict | None:
    """{"move": ..., "move_bins": ..., "action": ...} (each None without labels); None when none has
    any. Every fit of the three targets runs in `workers` processes side by side (run_fits)."""
    action_names = {int(m["action"]): m.get("action_name", str(m["action"])) for m in train.metas + test.metas
                    if "action" in m}
    targets = {"move": (move_label, dict(enumerate(MOVES))),
               "move_bins": (move_bin_label, {i: name for i, (name, _) in enumerate(MOVE_BINS)}),
               "action": (action_label, action_names)}
    planned = {name: fit_jobs(train, test, label, codebook, seed) for name, (label, _) in targets.items()}
    every = [job for plan in planned.values() if plan for job in plan[0]]
    scores = iter(run_fits(every, workers))
    result = {name: None if plan is None else finished(plan[0], [next(scores) for _ in plan[0]], plan[1],
                                                       targets[name][1])
              for name, plan in planned.items()}
    return result if any(result.values()) else None
