"""control/'s report.md files, in plain words first: the controller's scores (control/train.py), and
the rollouts and controllability (play.py), where the model's failures are the news."""
from __future__ import annotations

from pathlib import Path

from evaluation.formatting import num, pct
from pipeline.shards import atomic_write_bytes

CONTROL_GOAL = 0.95
REPORT_HORIZONS = (1, 10, 50)


def at(curves: dict, name: str, horizon: int):
    return curves[name][horizon - 1] if horizon <= len(curves[name]) else None


def failures(curves: dict) -> list[str]:
    """Where the rollouts go wrong, as sentences."""
    last = len(curves["horizon"])
    notes = []
    worse = [h for h, m, c in zip(curves["horizon"], curves["psnr"], curves["psnr_copy"])
             if m is not None and c is not None and m < c]
    if worse:
        notes.append(f"**Drift**: from step {worse[0]} on, the model's frames are further from the recording than "
                     f"the start frame itself ({num(at(curves, 'psnr', last))} dB against "
                     f"{num(at(curves, 'psnr_copy', last))} dB for copying the start frame at step {last}).")
    else:
        notes.append(f"The model stays closer to the recording than the start frame for all {last} steps "
                     f"({num(at(curves, 'psnr', last))} dB against {num(at(curves, 'psnr_copy', last))} dB at step {last}).")
    changed_first, changed_last = at(curves, "psnr_changed", 1), at(curves, "psnr_changed", last)
    notes.append(f"On the pixels that change, the model scores {num(changed_first)} dB after one step and "
                 f"{num(changed_last)} dB after {last} (copy: {num(at(curves, 'psnr_changed_copy', 1))} and "
                 f"{num(at(curves, 'psnr_changed_copy', last))} dB).")
    found = [(h, v) for h, v in zip(curves["horizon"], curves["ball_found"]) if v is not None]
    if found:
        lost = next((h for h, v in found if v < 0.5), None)
        notes.append(("**Losing the ball**: the ball is found in fewer than half the model's frames from step "
                      f"{lost} on" if lost else "The ball is found in at least half the model's frames throughout") +
                     f" (step 1: {pct(found[0][1], 0)}, step {found[-1][0]}: {pct(found[-1][1], 0)} of frames "
                     f"where the recording shows it).")
    phantom = at(curves, "ball_phantom", last)
    if phantom:
        notes.append(f"Where the recording shows no ball, the model draws one in {pct(phantom, 0)} of frames "
                     f"at step {last}.")
    real, model = at(curves, "bricks_broken_real", last), at(curves, "bricks_broken_model", last)
    if real is not None and model is not None:
        if real > 0 and model < 0.5 * real:
            notes.append(f"**Bricks never breaking**: in {last} steps the recording breaks {num(real)} bricks per start "
                         f"on average, the model {num(model)}.")
        else:
            notes.append(f"Bricks broken in {last} steps, per start: recording {num(real)}, model {num(model)} "
                         f"(a blurred-out brick counts as broken).")
    paddle, copy = at(curves, "paddle_error_px", last), at(curves, "paddle_error_px_copy", last)
    notes.append(f"Paddle x error after {last} steps: {num(paddle, 1)} px (the start frame's paddle: {num(copy, 1)} px); "
                 f"the paddle is not found in {pct(at(curves, 'paddle_lost', last), 0)} of the model's frames.")
    return notes


def control_verdict(control: dict) -> str:
    left, right = control["controller"]["left"]["success"], control["controller"]["right"]["success"]
    floor_l, floor_r = control["random_codes"]["left"]["success"], control["random_codes"]["right"]["success"]
    met = left is not None and right is not None and min(left, right) >= CONTROL_GOAL
    return (f"**Controllability {'meets' if met else 'misses'} the {CONTROL_GOAL:.0%} goal**: after "
            f"{control['steps']} steps of always-LEFT the paddle ended left of its start in {pct(left, 0)} of starts, "
            f"after always-RIGHT right of it in {pct(right, 0)} (random codes: {pct(floor_l, 0)} and "
            f"{pct(floor_r, 0)}).")


# ------------------------------------------------------------------------------------ controller
def write_controller_report(out: Path, metrics: dict, split: str, checkpoint: Path) -> Path:
    """report.md of a trained controller: its scores on `split` beside the most common code per cell."""
    scores = metrics[split]
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
    path = out / "report.md"
    atomic_write_bytes(path, ("\n".join(lines) + "\n").encode())
    return path


# ------------------------------------------------------------------------------------ rollouts
def choice(grids: int) -> str:
    return (f"the most likely of the {grids:,} whole code grids it saw in training" if grids else
            "each cell's most likely code on its own")


def write_play_report(out: Path, metrics: dict, figures: dict[str, str], gifs: list[str]) -> Path:
    curves = metrics["rollouts"]["curves"]
    lines = ["# Playing Breakout inside the model", "",
             f"LAM `{metrics['checkpoint']}` (step {metrics['lam_step']}), controller `{metrics['controller']}` "
             f"(step {metrics['controller_step']}); {metrics['split']} split of `{metrics['latent']}`.", "",
             f"{metrics['rollouts']['starts']} rollouts of {len(curves['horizon'])} steps from recorded "
             f"{metrics['split']} frames, driven by the recorded actions: each step the controller picks the codes "
             f"({choice(metrics.get('controller_grids', 0))}), the LAM decoder draws the next frame, and that frame is "
             "fed back in.", ""]
    lines += [f"- {note}" for note in failures(curves)]
    lines += ["", "| step | PSNR model | PSNR copy start | changed px model | changed px copy | paddle err px | "
                  "paddle err copy | ball found |", "|---|---|---|---|---|---|---|---|"]
    for h in REPORT_HORIZONS:
        if h <= len(curves["horizon"]):
            lines.append(f"| {h} | {num(at(curves, 'psnr', h))} | {num(at(curves, 'psnr_copy', h))} | "
                         f"{num(at(curves, 'psnr_changed', h))} | {num(at(curves, 'psnr_changed_copy', h))} | "
                         f"{num(at(curves, 'paddle_error_px', h), 1)} | {num(at(curves, 'paddle_error_px_copy', h), 1)} | "
                         f"{pct(at(curves, 'ball_found', h), 0)} |")
    lines += ["", f"![curves]({figures['curves']})", ""]
    lines += ["GIFs (recorded | model | |difference| in red): " + ", ".join(f"[{g}]({g})" for g in gifs), ""]
    control = metrics.get("controllability")
    if control:
        lines += ["## Controllability", "", control_verdict(control), "",
                  "| | LEFT | RIGHT |", "|---|---|---|"]
        for name, label in (("controller", "controller"), ("random_codes", "random codes (floor)")):
            row = control[name]
            lines.append(f"| {label} | {pct(row['left']['success'], 0)} of {row['left']['scored']} | "
                         f"{pct(row['right']['success'], 0)} of {row['right']['scored']} |")
        left = control["controller"]["left"]
        right = control["controller"]["right"]
        lines += ["", f"Starts whose paddle already touches the wall it is pushed towards are left out of that "
                      f"direction ({left['excluded_at_wall']} for LEFT, {right['excluded_at_wall']} for RIGHT), as are "
                      f"starts without a detectable paddle ({left['excluded_no_paddle']}); a generated frame without a "
                      f"paddle counts as a failure (LEFT {left['paddle_lost']}, RIGHT {right['paddle_lost']}). The random "
                      "floor is one rollout of uniformly random codes per start, scored for both directions.", "",
                  f"![controllability]({figures['controllability']})", ""]
    path = out / "report.md"
    atomic_write_bytes(path, ("\n".join(lines) + "\n").encode())
    return path
