"""control/'s report.md files, in plain words first: the controller's scores (control/train.py), and
the rollouts and controllability (play.py), where the model's failures are the news."""
from __future__ import annotations

from pathlib import Path

from evaluation.formatting import num, pct
from pipeline.shards import atomic_write_bytes

CONTROL_GOAL = 0.98
REPORT_HORIZONS = (1, 10, 25, 50, 100, 200)
KIND_NAMES = {"codes": "recorded codes", "controller": "controller"}
# What a neural Breakout that holds together does (issue "Play forward for 200 steps").
PADDLE_GOAL = 0.98                                   # paddle found, every step, both kinds
BALL_GOAL = {"codes": 0.90, "controller": 0.80}      # ball found where the recording shows one ...
BALL_STEPS = (10, 50, 200)                           # ... at these steps
PHANTOM_GOAL = 0.05                                  # a ball where the recording has none
PSNR_STEPS = {"codes": 200, "controller": 50}        # above copy-start at every step up to


def at(values: list, horizon: int):
    return values[horizon - 1] if horizon <= len(values) else None


def first_step(values: list, failing) -> int | None:
    """The first step (1-based) whose value fails, or None."""
    return next((h for h, v in enumerate(values, 1) if v is not None and failing(v)), None)


def kind_story(curves: dict, kind: str) -> list[str]:
    """Where one kind of rollout breaks down, in sentences."""
    c, copy, last = curves[kind], curves["copy"]["psnr"], len(curves["horizon"])
    below = first_step([None if m is None or k is None else m - k for m, k in zip(c["psnr"], copy)], lambda d: d < 0)
    notes = [(f"PSNR falls below copying the start frame at step {below}" if below else
              f"PSNR stays above copying the start frame for all {last} steps")
             + f" ({num(at(c['psnr'], last))} dB against {num(at(copy, last))} dB at step {last})."]
    lost = first_step(c["paddle_found"], lambda v: v < PADDLE_GOAL)
    notes.append(f"The paddle is found in fewer than {PADDLE_GOAL:.0%} of frames from step {lost} on "
                 f"({pct(at(c['paddle_found'], last), 0)} at step {last})." if lost else
                 f"The paddle is found in at least {PADDLE_GOAL:.0%} of frames at every step "
                 f"(within 2 px of the recording's: {pct(at(c['paddle_within_2px'], last), 0)} at step {last}).")
    goal = BALL_GOAL[kind]
    ball = first_step(c["ball_found"], lambda v: v < goal)
    notes.append((f"The ball is found in fewer than {goal:.0%} of the frames where the recording shows it from step {ball}"
                  if ball else f"The ball is found in at least {goal:.0%} of the frames where the recording shows it throughout")
                 + f" (step 10: {pct(at(c['ball_found'], 10), 0)}, step {last}: {pct(at(c['ball_found'], last), 0)}; "
                 "of those found a step earlier too, moving as the game's ball does: "
                 f"{pct(at(c['ball_moving'], 10), 0)} and {pct(at(c['ball_moving'], last), 0)}); "
                 f"a ball where there is none: {pct(max(v or 0 for v in c['ball_phantom']), 0)} at worst, "
                 f"two balls: {pct(max(v or 0 for v in c['two_balls']), 0)} at worst.")
    off = first_step(c["bricks_off"], lambda v: v > 0)
    notes.append(f"Bricks: by step {last} the recording lost {num(at(c['bricks_lost_real'], last))} bricks' worth of "
                 f"pixels per start, the model {num(at(c['bricks_lost_model'], last))}"
                 + (f"; the two part by more than a brick (+10 %) in some start from step {off}" if off else
                    "; within a brick (+10 %) of the recording's at every step")
                 + (f"; a brick that was gone stands again in {pct(at(c['bricks_back'], last), 0)} of starts."
                    if at(c["bricks_back"], last) else "; no brick comes back."))
    notes.append(f"Grain on the empty background: {pct(at(c['grain'], last), 2)} of its pixels at step {last} "
                 f"({pct(at(c['grain'], 1), 2)} after one step).")
    return notes


def goal_rows(curves: dict, control: dict | None) -> list[list[str]]:
    """Each goal, with each kind's value and whether it is met."""
    horizon = len(curves["horizon"])
    rows = []

    def row(goal: str, values: dict[str, tuple]) -> None:
        rows.append([goal] + [("—" if kind not in values else
                               f"{values[kind][0]} {'✔' if values[kind][1] else '✘'}") for kind in KIND_NAMES])

    kinds = [kind for kind in KIND_NAMES if kind in curves]
    worst = lambda kind, name, fn=min: fn(v for v in curves[kind][name] if v is not None)  # noqa: E731
    row(f"paddle found in ≥ {PADDLE_GOAL:.0%} of frames at every step",
        {k: (pct(worst(k, "paddle_found"), 0) + " at worst", worst(k, "paddle_found") >= PADDLE_GOAL) for k in kinds})
    for step in (s for s in BALL_STEPS if s <= horizon):
        row(f"ball found where the recording has one, step {step} (codes ≥ {BALL_GOAL['codes']:.0%}, "
            f"controller ≥ {BALL_GOAL['controller']:.0%})",
            {k: (pct(at(curves[k]["ball_found"], step), 0), (at(curves[k]["ball_found"], step) or 0) >= BALL_GOAL[k])
             for k in kinds})
    row(f"a ball where there is none ≤ {PHANTOM_GOAL:.0%}, at every step",
        {k: (pct(worst(k, "ball_phantom", max), 0) + " at worst", worst(k, "ball_phantom", max) <= PHANTOM_GOAL)
         for k in kinds})
    row("never two balls", {k: (pct(worst(k, "two_balls", max), 1) + " at worst", worst(k, "two_balls", max) == 0)
                             for k in kinds})
    if "codes" in curves:
        row("brick pixels lost within a brick (+10 %) of the recording's, every start and step",
            {"codes": (pct(worst("codes", "bricks_off", max), 0) + " of starts off at worst",
                       worst("codes", "bricks_off", max) == 0)})
        row("a broken brick never comes back", {"codes": (pct(at(curves["codes"]["bricks_back"], horizon), 0)
                                                           + " of starts", not at(curves["codes"]["bricks_back"], horizon))})
    for kind in kinds:
        until = min(PSNR_STEPS[kind], horizon)
        gaps = [m - c for m, c in zip(curves[kind]["psnr"][:until], curves["copy"]["psnr"][:until])
                if m is not None and c is not None]
        row(f"PSNR above copy-start at every step to {until} ({KIND_NAMES[kind]})",
            {kind: (f"{min(gaps):+.2f} dB at worst", min(gaps) > 0)})
    if control:
        for side in ("left", "right"):
            value = control["controller"][side]["success"]
            row(f"held {side.upper()} for {control['steps']} steps moves the paddle that way (≥ {CONTROL_GOAL:.0%})",
                {"controller": (pct(value, 0), (value or 0) >= CONTROL_GOAL)})
    return rows


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
    kinds = [kind for kind in KIND_NAMES if kind in curves]
    horizon = len(curves["horizon"])
    lines = ["# Playing Breakout inside the model", "",
             f"LAM `{metrics['checkpoint']}` (step {metrics['lam_step']}), controller `{metrics['controller']}` "
             f"(step {metrics['controller_step']}); {metrics['split']} split of `{metrics['latent']}`; "
             + (f"frames drawn by the world model `{metrics['world']}` (docs/world-model.md)." if metrics.get("world")
                else "frames drawn by the LAM's decoder."), "",
             f"{metrics['rollouts']['starts']} rollouts of {horizon} steps from recorded {metrics['split']} frames "
             f"({metrics['rollouts']['episodes']} episodes), every generated frame fed back in"
             + (" after snapping it to the game's palette" if metrics.get("palette") else " as the decoder drew it")
             + ". Two kinds: **recorded codes** (the codes extracted from the recording at each step: the decoder's "
             "drift alone) and **controller** (the controller's codes for the recorded action, "
             f"{choice(metrics.get('controller_grids', 0))}: what a player gets), beside copying the start frame.", ""]
    lines += [f"**Made from another model:** {note}." for note in metrics.get("made_from_other", [])]
    lines += [""] if metrics.get("made_from_other") else []
    for kind in kinds:
        lines += [f"**{KIND_NAMES[kind].capitalize()}.**", ""] + [f"- {note}" for note in kind_story(curves, kind)] + [""]
    control = metrics.get("controllability")
    lines += ["## Goals", "", "| goal | recorded codes | controller |", "|---|---|---|"]
    lines += ["| " + " | ".join(row) + " |" for row in goal_rows(curves, control)]
    steps = [h for h in REPORT_HORIZONS if h <= horizon]
    measures = [("PSNR (dB)", "psnr", num), ("paddle found", "paddle_found", pct0), ("paddle within 2 px", "paddle_within_2px", pct0),
                ("ball found (recording shows one)", "ball_found", pct0),
                ("ball moving (of those found a step earlier too)", "ball_moving", pct0),
                ("ball where none", "ball_phantom", pct0),
                ("two balls", "two_balls", pct0), ("bricks lost (recording's)", "bricks_lost_model", num),
                ("starts with a brick back", "bricks_back", pct0), ("grain (% of empty pixels)", "grain", pct2)]
    lines += ["", "## Step by step", "", "| measure | " + " | ".join(f"step {h}" for h in steps) + " |",
              "|---|" + "---|" * len(steps)]
    lines.append("| PSNR, copy start frame | " + " | ".join(num(at(curves["copy"]["psnr"], h)) for h in steps) + " |")
    for kind in kinds:
        for label, name, fmt in measures:
            cells = [fmt(at(curves[kind][name], h)) for h in steps]
            if name == "bricks_lost_model":
                cells = [f"{cell} ({num(at(curves[kind]['bricks_lost_real'], h))})" for cell, h in zip(cells, steps)]
            lines.append(f"| {KIND_NAMES[kind]}: {label} | " + " | ".join(cells) + " |")
    lines += ["", f"![curves]({figures['curves']})", "",
              "GIFs (recorded | " + " | ".join(KIND_NAMES[k] for k in kinds) + "): "
              + ", ".join(f"[{g}]({g})" for g in gifs), ""]
    if control:
        lines += ["## Controllability", "", control_verdict(control), "",
                  "| | LEFT | RIGHT |", "|---|---|---|"]
        for name, label in (("controller", "controller"), ("random_codes", "random codes (floor)")):
            row = control[name]
            lines.append(f"| {label} | {pct(row['left']['success'], 0)} of {row['left']['scored']} | "
                         f"{pct(row['right']['success'], 0)} of {row['right']['scored']} |")
        left, right = control["controller"]["left"], control["controller"]["right"]
        lines += ["", f"Starts whose paddle already touches the wall it is pushed towards are left out of that "
                      f"direction ({left['excluded_at_wall']} for LEFT, {right['excluded_at_wall']} for RIGHT), as are "
                      f"starts without a detectable paddle ({left['excluded_no_paddle']}); a generated frame without a "
                      f"paddle counts as a failure (LEFT {left['paddle_lost']}, RIGHT {right['paddle_lost']}). The random "
                      "floor is one rollout of uniformly random codes per start, scored for both directions.", "",
                  f"![controllability]({figures['controllability']})", ""]
    path = out / "report.md"
    atomic_write_bytes(path, ("\n".join(lines) + "\n").encode())
    return path


def pct0(value) -> str:
    return pct(value, 0)


def pct2(value) -> str:
    return pct(value, 2)


# ------------------------------------------------------------------------------------ session
SESSION_TITLE = "## A person-like session on the play page"


def session_section(result: dict) -> str:
    """The person-like session on the play page (control/session.py, `play.py session`): the goals
    first, then what the ball and the presses did and what each number counts."""
    score, rate = result["score"], result["steps_per_s"]
    ball, bricks, presses, rules = score["ball"], score["bricks"], score["presses"], result["rules"]
    met = sum(goal["met"] for goal in result["goals"])
    values = [f"{pct0(score['paddle']['seen'])} ({score['paddle']['missing_frames']} of {score['steps']} frames without)",
              f"{pct0(ball['seen'])} of {ball['scored_frames']} frames",
              f"{pct0(ball['moving'])} of {ball['steps_seen_twice']} steps",
              f"{bricks['broken']} ({bricks['start']} at the start, {bricks['end']} at the end, "
              f"{bricks['came_back']} back)"]
    lines = [SESSION_TITLE, "",
             f"`play.py session` played {result['steps']} steps on the play page in headless Chromium as a person "
             f"would: {result['policy']}, pressing the page's keys and reading each frame the page showed. "
             f"LAM `{result.get('checkpoint', '?')}`, controller `{result.get('controller', '?')}`, started from a "
             f"random test frame (seed {result.get('seed', '?')}); "
             f"{'n/a' if rate is None else f'{rate:.1f}'} steps/s through the page, browser included.", "",
             *[f"**Made from another model:** {note}." for note in result.get("made_from_other", [])],
             f"**{met} of {len(result['goals'])} goals met.**", "", "| goal | session | met |", "|---|---|---|"]
    lines += [f"| {goal['goal']} | {value} | {'✔' if goal['met'] else '✘'} |" for goal, value in zip(result["goals"], values)]
    left, right = presses["left"], presses["right"]
    keys = ", ".join(f"{name} {count}" for name, count in score["actions"].items())
    times = lambda n: f"{n} time{'' if n == 1 else 's'}"  # noqa: E731
    lines += ["", f"- Ball: launched {times(ball['launches'])} (FIRE while out of play), lost through the bottom "
                  f"{times(ball['lost_out_of_bottom'])}, vanished in the field {times(ball['vanished_in_field'])}; "
                  f"{ball['frames_waiting_after_fire']} frames waited for it after a launching FIRE.",
              f"- Presses that moved the paddle that way: LEFT {pct0(left['moved'])} of {left['scored']}, "
              f"RIGHT {pct0(right['moved'])} of {right['scored']} (left out at the wall: {left['at_wall']} and "
              f"{right['at_wall']}; without a paddle: {left['no_paddle']} and {right['no_paddle']}; the next frame "
              f"lost the paddle: {left['paddle_lost']} and {right['paddle_lost']}). Keys pressed: {keys}.",
              f"- What is counted: generated frames only (the start frame is a recorded one). The ball is in play "
              "from the frame after a FIRE (or a frame that shows it) until it vanishes after being seen at or below "
              f"row {rules['out_of_play_y']} (through the bottom); while in play a frame without it is a miss, whether it vanished higher "
              "up or has not appeared yet after the FIRE. The ball moves in a step if the frames before and after both "
              f"show it and it went at least {rules['ball_step_px']} px across or down (a frozen ball is seen, not "
              "played). Bricks broken: standing at the start, gone at the end, and "
              "never standing again once gone. A press is scored unless the paddle touches the wall it is pushed "
              f"toward (left edge ≤ {rules['wall_left_x']} for LEFT, ≥ {rules['wall_right_x']} for RIGHT) or is not seen; it moved if the next frame's paddle "
              "is on that side (the game's paddle keeps some momentum, so a reversal can take a step).", "",
              f"Every {rules['sheet_every']}th frame, labelled with its step and the key that produced it (`session.json` has every "
              "frame's paddle, ball and brick count):", "", f"![session]({result['contact_sheet']})", ""]
    return "\n".join(lines)
