"""`make readme-figures`: the README's headline table, its rollout GIF and its pipeline picture, made
from a demo's reports rather than copied by hand, so that every figure on the page says which
commit and machine it came from.

    python -m bench.readme_figures [--reports reports] [--readme README.md] [--img docs/img] [--gif NAME]

Reads `<reports>/test/metrics.json` (evaluate.py) and, where it exists, `<reports>/play/metrics.json`
(play.py rollout); writes the table between the README's marker comments (README_BEGIN, README_END:
temp file and rename, the rest of the page untouched), copies one of the rollout's GIFs to
`<img>/rollout.gif` and draws `<img>/pipeline.png`. Each report's `provenance` (common/provenance.py)
gives the commit, the machine and the checkpoint; a report written before reports recorded it is
named as such.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from common.cli import add_config_flags, config_values, flag
from common.errors import UserError, run_cli
from common.provenance import describe
from evaluation.formatting import num, pct
from pipeline.shards import atomic_write_bytes

README_BEGIN = "<!-- readme-figures:begin: written by `make readme-figures` from reports/; do not edit by hand -->"
README_END = "<!-- readme-figures:end -->"
GIF_NAME = "rollout.gif"
PIPELINE_NAME = "pipeline.png"


@dataclass
class FiguresConfig:
    reports: Path = flag(Path("reports"), "a demo's reports: test/metrics.json, and play/metrics.json with its GIFs")
    readme: Path = flag(Path("README.md"), "the page whose marked table is rewritten")
    img: Path = flag(Path("docs/img"), "where rollout.gif and pipeline.png go")
    gif: str | None = flag(None, "which GIF of the rollout report (default: the first it lists)")
    pipeline: bool = flag(True, "also draw pipeline.png (--no-pipeline: leave it)")


# ------------------------------------------------------------------------------------ reading
def read_report(path: Path, command: str) -> dict:
    if not path.is_file():
        raise UserError(f"{path}: not found; {command} writes it (make demo runs every stage)")
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UserError(f"{path}: not a readable report ({str(error)[:120]})") from None


def dig(report: dict, *keys: str):
    """report[k1][k2]..., or None where any level is missing."""
    for key in keys:
        if not isinstance(report, dict):
            return None
        report = report.get(key)
    return report


def at_step(values: list | None, step: int):
    return values[step - 1] if values and 0 < step <= len(values) else None


# ------------------------------------------------------------------------------------ the table
def headline_rows(test: dict, play: dict | None) -> list[list[str]]:
    """[what, the model, the baseline] for one step on the test split and, with a rollout report,
    for playing forward."""
    model, copy = test.get("model", {}), test.get("copy_baseline", {})
    elements = test.get("elements", {})
    rows = [["one step: PSNR (dB), all pixels / the pixels that change",
             f"{num(model.get('psnr'))} / {num(model.get('psnr_changed'))}",
             f"copy frame t: {num(copy.get('psnr'))} / {num(copy.get('psnr_changed'))}"],
            ["one step: paddle / ball drawn within 2 px of the true frame's",
             f"{pct(dig(elements, 'paddle', 'model', 'within_2px'))} / {pct(dig(elements, 'ball', 'model', 'within_2px'))}",
             f"copy frame t: {pct(dig(elements, 'paddle', 'copy_baseline', 'within_2px'))} / "
             f"{pct(dig(elements, 'ball', 'copy_baseline', 'within_2px'))}"]]
    move = dig(test, "actions", "move")
    if move:
        rows.append(["the paddle's move (left / still / right) read from the codes, linear probe",
                     pct(move.get("codes_linear"), 0),
                     f"pixel difference {pct(move.get('pixel_diff'), 0)}, frame t alone {pct(move.get('frame_t'), 0)}"])
    codebook = test.get("codebook", {})
    rows.append(["codes in use, of the codebook's", f"{pct(codebook.get('used_fraction'), 0)} of "
                 f"{len(codebook.get('counts') or []) or 'n/a'}", ""])
    if play:
        curves = dig(play, "rollouts", "curves") or {}
        horizon = len(curves.get("horizon") or [])
        held = at_step(dig(curves, "copy", "psnr"), horizon)
        for kind, label in (("codes", "on the recorded codes"), ("controller", "with the controller's codes")):
            if kind not in curves:
                continue
            c = curves[kind]
            # a frozen ball is found too: "moving" is the share of those found a step earlier that moved
            rows.append([f"played forward {horizon} steps {label}: PSNR (dB) / paddle found / ball found "
                         f"(moving as the game's), at step {horizon}",
                         f"{num(at_step(c.get('psnr'), horizon))} / {pct(at_step(c.get('paddle_found'), horizon), 0)} / "
                         f"{pct(at_step(c.get('ball_found'), horizon), 0)} ({pct(at_step(c.get('ball_moving'), horizon), 0)})",
                         f"the start frame held: {num(held)} dB"])
        control = play.get("controllability")
        if control:
            success = lambda who, side: pct(dig(control, who, side, "success"), 0)  # noqa: E731
            rows.append([f"held LEFT / RIGHT for {control.get('steps')} steps moves the paddle that way",
                         f"{success('controller', 'left')} / {success('controller', 'right')}",
                         f"random codes: {success('random_codes', 'left')} / {success('random_codes', 'right')}"])
    return rows


def trained(record: dict | None) -> str:
    if not record:
        return ""
    parts = [f"{key} {record[key]}" for key in ("preset", "variant") if record.get(key)]
    if record.get("trained_at"):
        parts.append(f"trained at commit {record['trained_at'][:7]}")
    return ", ".join(parts)


def source_lines(test: dict, play: dict | None, reports: Path) -> list[str]:
    """Which data, checkpoint, commit and machine the table's figures come from."""
    test_source = test.get("provenance")
    checkpoint = test.get("checkpoint") or {}
    model = f"LAM checkpoint {str(checkpoint.get('sha256', '?'))[:12]} (step {checkpoint.get('step', '?')}"
    model += f"; {trained(test_source)})" if trained(test_source) else ")"
    lines = [f"One step: the {test.get('split', '?')} split, {test.get('pairs', '?')} pairs. " + model
             + (f", {test_source['precision']}" if test_source and test_source.get("precision") else "") + "."]
    if play:
        rollouts = play.get("rollouts", {})
        episodes = rollouts.get("episodes", "?")
        lines.append(f"Played forward: {rollouts.get('starts', '?')} starts of the {play.get('split', '?')} split "
                     f"({episodes} episode{'' if episodes == 1 else 's'}), every generated frame fed back"
                     + (" after snapping it to the game's palette" if play.get("palette") else "")
                     + f"; controller step {play.get('controller_step', '?')}.")
    play_source = play.get("provenance") if play else None
    same = play is None or same_origin(test_source, play_source)
    if same:
        lines.append(f"Measured at {describe(test_source)}.")
    else:
        lines.append(f"One step measured at {describe(test_source)}. Played forward at {describe(play_source)}.")
    names = [f"`{reports.name}/test/metrics.json`"] + ([f"`{reports.name}/play/metrics.json`"] if play else [])
    lines.append(f"Written by `make readme-figures` from {' and '.join(names)}.")
    return lines


def same_origin(one: dict | None, other: dict | None) -> bool:
    keys = ("commit", "dirty", "cpu", "gpu", "torch")
    return bool(one) and bool(other) and all(one.get(key) == other.get(key) for key in keys)


def check_same_checkpoint(test: dict, play: dict | None) -> None:
    """The two reports must be of one checkpoint, or the table would set two models side by side."""
    ours = dig(test, "checkpoint", "sha256")
    theirs = dig(play, "provenance", "checkpoint_sha256") if play else None
    if ours and theirs and ours != theirs:
        raise UserError(f"the test report is of checkpoint {ours[:12]}, the rollout report of {theirs[:12]}: "
                        f"run make eval and make rollout on one checkpoint")


def headline_block(test: dict, play: dict | None, reports: Path) -> str:
    rows = headline_rows(test, play)
    lines = ["| | the model | baseline |", "|---|---|---|"] + ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines + [""] + source_lines(test, play, reports))


# ------------------------------------------------------------------------------------ writing
def with_block(text: str, block: str, where: Path) -> str:
    """`text` with what lies between the marker lines replaced by `block`."""
    begin, end = text.find(README_BEGIN), text.find(README_END)
    if begin < 0 or end < 0 or end < begin or text.count(README_BEGIN) != 1 or text.count(README_END) != 1:
        raise UserError(f"{where}: needs one line {README_BEGIN!r} and, after it, one line {README_END!r}; "
                        f"the table goes between them")
    return text[:begin + len(README_BEGIN)] + "\n" + block.strip() + "\n" + text[end:]


def copy_gif(play_dir: Path, play: dict, name: str | None, img: Path) -> Path | None:
    gifs = play.get("gifs") or []
    chosen = name or (gifs[0] if gifs else None)
    if chosen is None:
        return None
    if Path(chosen).name != chosen or not (play_dir / chosen).is_file():
        raise UserError(f"{play_dir / chosen}: no such GIF (the report lists {', '.join(gifs) or 'none'})")
    target = img / GIF_NAME
    atomic_write_bytes(target, (play_dir / chosen).read_bytes())
    return target


# ------------------------------------------------------------------------------------ the pipeline picture
STAGES = [  # (column, row, what, where or what it holds)
    (0, 0, "ALE Breakout", "the real emulator"),
    (1, 0, "bulk_videos/", "<episode>/<N>.png"),
    (2, 0, "shards/pairs/", "(t, t+1) tars, .idx, manifest"),
    (3, 0, "best.pt", "checkpoints/latent_action/"),
    (3, 1, "reports/test/", "metrics.json, report.md"),
    (2, 1, "shards/latent/", "frames t, t+1 and codes"),
    (1, 1, "controller.pt", "checkpoints/controller/"),
    (0, 1, "reports/play/", "rollouts and their GIFs"),
    (2, 2, "your model", "webdataset, HF datasets"),
]
ARROWS = [  # (from, to, command, what runs)
    (0, 1, "make data", "pipeline.record"),
    (1, 2, "make shards", "pipeline.pack"),
    (2, 3, "make train", "train.py"),
    (3, 4, "make eval", "evaluate.py"),
    (3, 5, "make extract", "extract.py"),
    (5, 6, "make controller", "control.train"),
    (6, 7, "make rollout", "play.py"),
    (5, 8, "", ""),
]


def draw_pipeline(path: Path) -> Path:
    """The stages as a picture: each box a folder a stage writes, each arrow the command that writes it."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

    width, height, col, row = 2.6, 0.85, 4.3, 1.55          # in inches: the axes fill the figure, one unit an inch
    left, right, bottom, top = -0.1, 3 * col + width + 0.1, -(2 * row + height) - 0.1, 0.1
    fig = plt.figure(figsize=(right - left, top - bottom), dpi=100)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(left, right)
    ax.set_ylim(bottom, top)
    ax.axis("off")
    centre = {}
    for i, (c, r, name, what) in enumerate(STAGES):
        x, y = c * col, -r * row - height
        mine = name == "your model"
        ax.add_patch(FancyBboxPatch((x, y), width, height, boxstyle="round,pad=0.02,rounding_size=0.08",
                                    facecolor="#fff4e0" if mine else "#eef3fb", edgecolor="#c07a00" if mine else "#3a5a8c",
                                    linewidth=1.2))
        ax.text(x + width / 2, y + height * 0.64, name, ha="center", va="center", family="monospace", fontsize=15,
                weight="bold")
        ax.text(x + width / 2, y + height * 0.27, what, ha="center", va="center", fontsize=12, color="#333333")
        centre[i] = (x, y)
    for start, end, command, module in ARROWS:
        (x0, y0), (x1, y1) = centre[start], centre[end]
        if y0 == y1:                             # along a row, left to right or right to left
            rightward = x1 > x0
            a = (x0 + width if rightward else x0, y0 + height / 2)
            b = (x1 if rightward else x1 + width, y1 + height / 2)
        else:                                    # down a column, or down and across
            a, b = (x0 + width / 2, y0), (x1 + width / 2, y1 + height)
            if x0 != x1:
                a = (x0 + width * 0.25, y0)
        ax.add_patch(FancyArrowPatch(a, b, arrowstyle="-|>", mutation_scale=14, color="#555555", linewidth=1.2))
        if command:                              # the command above the arrow, what it runs below it
            mx, my = (a[0] + b[0]) / 2, (a[1] + b[1]) / 2
            diagonal = y0 != y1 and x0 != x1
            side = "center" if y0 == y1 else "left"
            mx += 0.2 if diagonal else (0.08 if side == "left" else 0)
            high, low = (-0.02, -0.24) if diagonal else (0.1, -0.08)       # a diagonal: both below the line
            ax.text(mx, my + high, command, ha=side, va="top" if diagonal else "bottom", family="monospace",
                    fontsize=12.5)
            ax.text(mx, my + low, module, ha=side, va="top", fontsize=11.5, color="#555555")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, metadata={"Software": None})
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------------ the command
def readme_figures(cfg: FiguresConfig) -> dict[str, Path | None]:
    """Rewrite the README's table from the reports, copy the GIF, draw the pipeline; what was written."""
    test = read_report(cfg.reports / "test" / "metrics.json", "make eval")
    play_path = cfg.reports / "play" / "metrics.json"
    play = read_report(play_path, "make rollout") if play_path.is_file() else None
    check_same_checkpoint(test, play)
    if not cfg.readme.is_file():
        raise UserError(f"{cfg.readme}: not found")
    text = with_block(cfg.readme.read_text(), headline_block(test, play, cfg.reports), cfg.readme)
    gif = copy_gif(play_path.parent, play, cfg.gif, cfg.img) if play else None
    pipeline = draw_pipeline(cfg.img / PIPELINE_NAME) if cfg.pipeline else None
    atomic_write_bytes(cfg.readme, text.encode())           # last: the page never names a GIF not yet there
    return {"readme": cfg.readme, "gif": gif, "pipeline": pipeline}


def cli(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.readme_figures", description=__doc__.split("\n\n")[0])
    add_config_flags(parser, FiguresConfig)
    cfg = FiguresConfig(**config_values(parser.parse_args(argv), FiguresConfig))
    written = readme_figures(cfg)
    print(f"wrote the table in {written['readme']}"
          + (f", {written['gif']}" if written["gif"] else " (no rollout report: one-step rows only, no GIF)")
          + (f", {written['pipeline']}" if written["pipeline"] else ""))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(cli, argv)


if __name__ == "__main__":
    sys.exit(main())
