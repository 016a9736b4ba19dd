"""report.md for one evaluated split, and reports/summary.md with every evaluated split side by side.

The wording is plain on purpose: if the model does not beat copying frame t, the report says so
first, before any other number."""
from __future__ import annotations

import json
from pathlib import Path

from evaluation.formatting import num, pct, table
from pipeline.shards import atomic_write_bytes

SEED_PSNR_TARGET = 28.0        # the seed's success criterion, stated for RGB frames
SEED_USED_TARGET = 0.5         # at least half the codebook in use
SPLIT_ORDER = {"train": 0, "val": 1, "test": 2}
EVALUATION_FORMAT = "lam-evaluation/1"      # metrics.json of evaluate.py, told from other tools' by it


# ------------------------------------------------------------------------------------ verdicts
def copy_verdict(metrics: dict) -> str:
    model, copy = metrics["model"], metrics["copy_baseline"]
    if model["psnr"] is None or copy["psnr"] is None:
        return "One of the predictions matches frame t+1 exactly (infinite PSNR); see the table."
    gap = model["psnr"] - copy["psnr"]
    changed = ""
    if model["psnr_changed"] is not None and copy["psnr_changed"] is not None:
        better = model["psnr_changed"] > copy["psnr_changed"]
        changed = (f" On the pixels that change between t and t+1 it scores {num(model['psnr_changed'])} dB against "
                   f"{num(copy['psnr_changed'])} dB for the copy: it {'does' if better else 'does not'} "
                   f"predict the change better than leaving it out.")
    if gap <= 0:
        return (f"**The model does not beat copying frame t.** Its predictions of frame t+1 score "
                f"{num(model['psnr'])} dB PSNR; simply repeating frame t scores {num(copy['psnr'])} dB "
                f"({num(-gap)} dB better than the model).{changed}")
    return (f"**The model beats copying frame t** by {num(gap)} dB PSNR ({num(model['psnr'])} against "
            f"{num(copy['psnr'])} dB).{changed}{caveats(metrics)}")


def caveats(metrics: dict) -> str:
    """What a PSNR win hides: PSNR rewards putting the moving pieces roughly right, so a blurry
    prediction can beat the sharp copy on PSNR and still lose on SSIM or on the ball."""
    notes = []
    model_ssim, copy_ssim = metrics["model"].get("ssim"), metrics["copy_baseline"].get("ssim")
    if model_ssim is not None and copy_ssim is not None and model_ssim < copy_ssim:
        notes.append(f" Its SSIM is lower than the copy's ({num(model_ssim, 4)} against {num(copy_ssim, 4)}): "
                     f"the prediction is blurrier than frame t.")
    ball = metrics.get("elements", {}).get("ball", {})
    if ball.get("model", {}).get("missing") is not None and ball.get("copy_baseline", {}).get("missing") is not None:
        missing, copy_missing = ball["model"]["missing"], ball["copy_baseline"]["missing"]
        if missing > copy_missing + 0.1:
            notes.append(f" The ball is missing from {pct(missing)} of the predicted frames where the true frame "
                         f"shows it (copy: {pct(copy_missing)}).")
    return "".join(notes)


def drawing_verdict(metrics: dict) -> str:
    """Does the prediction draw what moved where it went? Paddle and ball beside copying frame t,
    which leaves both where they were (so it is within 2 px only when they barely moved)."""
    elements = metrics.get("elements") or {}
    if "paddle" not in elements or "ball" not in elements:
        return ""
    paddle, paddle_copy = elements["paddle"]["model"], elements["paddle"]["copy_baseline"]
    ball, ball_copy = elements["ball"]["model"], elements["ball"]["copy_baseline"]
    return (f"**Drawing what moved**: the paddle is within 2 px of its true place in {pct(paddle.get('within_2px'))} "
            f"of the predicted frames (copy frame t: {pct(paddle_copy.get('within_2px'))}) and missing from "
            f"{pct(paddle.get('missing'))}; the ball is within 2 px in {pct(ball.get('within_2px'))} (copy: "
            f"{pct(ball_copy.get('within_2px'))}) and missing from {pct(ball.get('missing'))} (copy: "
            f"{pct(ball_copy.get('missing'))}).")


def codes_verdict(metrics: dict) -> str:
    delta = metrics["delta_psnr"]
    if delta is None:
        return "ΔPSNR is undefined (a perfect prediction)."
    if delta <= 0.1:
        return (f"Decoding random codes scores about as well as the inferred codes (ΔPSNR {num(delta)} dB): "
                f"the decoder makes little use of the codes.")
    return f"The inferred codes are worth {num(delta)} dB over random codes (ΔPSNR): the decoder uses them."


def criteria_lines(metrics: dict) -> list[str]:
    psnr, used = metrics["model"]["psnr"], metrics["codebook"]["used_fraction"]
    if metrics["color"] == "rgb":
        met = psnr is not None and psnr > SEED_PSNR_TARGET
        psnr_line = f"PSNR > {SEED_PSNR_TARGET:.0f} dB (RGB): {num(psnr)} dB, {'met' if met else 'not met'}."
    else:
        psnr_line = (f"PSNR > {SEED_PSNR_TARGET:.0f} dB is stated for RGB frames; this model is gray and scores "
                     f"{num(psnr)} dB (the copy baseline alone scores {num(metrics['copy_baseline']['psnr'])} dB, "
                     f"so the target says little on Breakout).")
    used_line = (f"At least {SEED_USED_TARGET:.0%} of the codebook used: {pct(used)}, "
                 f"{'met' if used >= SEED_USED_TARGET else 'not met'}.")
    return [psnr_line, used_line]


# ------------------------------------------------------------------------------------ sections
def reconstruction_section(metrics: dict) -> str:
    rows = []
    for label, name in (("model", "model"), ("copy frame t", "copy_baseline"), ("random codes", "random_codes")):
        m = metrics.get(name)
        if m:
            rows.append([label, num(m["psnr"]), num(m["ssim"], 4), num(m["l1"], 5), num(m["l2"], 6),
                         num(m["psnr_changed"])])
    return "\n".join([
        "## Reconstruction of frame t+1", "",
        table(["prediction", "PSNR dB", "SSIM", "L1", "L2 (MSE)", "PSNR on changed pixels dB"], rows), "",
        "PSNR = 10·log10(1/MSE), MSE over every pixel of the split, frames in [0, 1], "
        f"{metrics['color']}. Changed pixels: where frame t and frame t+1 differ.", "",
        codes_verdict(metrics), "",
        "![reconstructions](reconstructions.png)", "",
        "Rows are the pairs of the split where most pixels change.", ""])


def codebook_section(metrics: dict) -> str:
    book = metrics["codebook"]
    return "\n".join([
        "## Codebook", "",
        f"{pct(book['used_fraction'])} of the {len(book['counts'])} codes are used on this split; "
        f"perplexity {num(book['perplexity'], 1)} (the number of equally used codes with the same entropy).", "",
        "![codebook histogram](codebook_histogram.png)", "", "![t-SNE of code vectors](code_tsne.png)", ""])


def elements_section(metrics: dict) -> str:
    elements = metrics["elements"]
    rows = []
    for element, fields in (("paddle", ("mean_abs_error_px", "within_2px", "missing", "moved_within_2px")),
                            ("ball", ("mean_error_px", "within_2px", "missing", "spurious")),
                            ("bricks", ("cell_accuracy", "map_accuracy", "broken_shown"))):
        model, copy = elements[element]["model"], elements[element]["copy_baseline"]
        for name in fields:
            fmt = (lambda v: num(v)) if name.endswith("_px") else pct
            rows.append([element, name.replace("_", " "), fmt(model.get(name)), fmt(copy.get(name))])
    paddle, ball, bricks = (elements[k]["model"] for k in ("paddle", "ball", "bricks"))
    return "\n".join([
        "## Game elements", "",
        "Detected from pixels (evaluation/events.py) in the true and the predicted frame t+1: paddle left edge, "
        "ball top-left, and the 6 × 18 brick map.", "",
        table(["element", "measure", "model", "copy frame t"], rows), "",
        f"Pairs: paddle {paddle['pairs']} (moved in {paddle['moved_pairs']}), ball visible in {ball['pairs']}, "
        f"a brick broken in {bricks['broken_pairs']}. 'within 2px' counts a missing object as a miss; "
        "'broken shown' = the prediction shows the brick that broke as gone.", ""])


def events_section(metrics: dict) -> str:
    analysis = metrics["events"]["codes"]
    rows = [[kind, info["transitions"], num(info["nmi_max"], 3), num(info["nmi_mean"], 3), tuple(info["best_cell"]),
             ", ".join(f"{c['code']} (×{c['lift']:.1f})" for c in info["top_codes"][:3]) or "-"]
            for kind, info in analysis.items()]
    return "\n".join([
        "## Codes by gameplay event", "",
        "Events from pixels (life lost from the recorder's labels when present). NMI between each grid cell's "
        "code and the event; 0 means the code says nothing about the event, 1 that it determines it.", "",
        table(["event", "transitions", "NMI max", "NMI mean", "best cell", "top codes at best cell (lift)"], rows), "",
        "![codes by event](codes_by_event.png)", ""])


def accuracy_stderr(accuracy: float, n: int | None) -> float:
    """Binomial standard error of an accuracy measured on n transitions (inf when n is unknown)."""
    return (accuracy * (1 - accuracy) / n) ** 0.5 if n else float("inf")


def probe_verdict(probe: dict, what: str) -> str:
    """Do the codes carry `what`? Beside frame t alone (the scene) and the pixel difference (the ceiling)."""
    codes = max((v for v in (probe["codes_linear"], probe["codes_mlp"]) if v is not None), default=None)
    frame, ceiling, majority = probe["frame_t"], probe["pixel_diff"], probe["majority"]
    if codes is None:
        return f"The train split has a single {what} class: no probe."
    margin = 2 * accuracy_stderr(codes, probe.get("transitions"))
    if frame is not None and codes > frame + margin:
        near = ceiling is not None and codes >= ceiling - 0.05
        return (f"**The codes carry the {what}**: {pct(codes)} from the codes against {pct(frame)} from frame t "
                f"alone (more than two standard errors apart){'' if not near else ', close to'}"
                f"{' the' if not near else ''} {pct(ceiling)} the pixel difference allows.")
    return (f"**The codes do not carry the {what} beyond what the scene shows**: {pct(codes)} from the codes, "
            f"{pct(frame)} from frame t alone, {pct(majority)} for the majority class, while the pixel difference "
            f"reaches {pct(ceiling)}.")


def actions_section(metrics: dict) -> str:
    actions = metrics.get("actions")
    if not actions:
        return "## Actions\n\nThe pairs carry no labels: no action probe.\n"
    parts = ["## Actions: do the codes carry them?", "",
             f"Probes fitted on train pairs (codes {actions.get('train_codes_from', 'encoded now')}), scored on "
             f"this split. `move` is the paddle's effective move (left / none / right) from the recorder's labels, "
             f"`move_bins` how far it moved (≤ −16, −15..−4, −3..3, 4..15, ≥ 16 px); "
             f"`action` is the recorded action where it had a visible effect.", ""]
    for target, what in (("move", "paddle's move"), ("move_bins", "paddle's displacement (5 bins)"), ("action", "action")):
        probe = actions.get(target)
        if not probe:
            continue
        classes = ", ".join(f"{name} {count}" for name, count in probe["classes"].items())
        parts += [f"**{target}** ({probe['transitions']} pairs: {classes}; fitted on {probe['train_transitions']}):", "",
                  table(["predictor", "accuracy"], [["linear probe on one-hot codes", pct(probe["codes_linear"])],
                                                    ["MLP on code vectors", pct(probe["codes_mlp"])],
                                                    ["MLP on frame t alone (the scene)", pct(probe["frame_t"])],
                                                    ["MLP on the pixel difference t+1 - t (ceiling)", pct(probe["pixel_diff"])],
                                                    [f"majority class ({probe['majority_class']})", pct(probe["majority"])]]),
                  "", probe_verdict(probe, what), ""]
    return "\n".join(parts)


# ------------------------------------------------------------------------------------ files
def write_report(out: Path, metrics: dict, figures: dict[str, str], checkpoint_path: str) -> Path:
    checkpoint = metrics["checkpoint"]
    others = [m for m in sibling_metrics(out.parent) if m["split"] != metrics["split"]]
    parts = [f"# Latent action model on the {metrics['split']} split", "",
             f"Checkpoint `{checkpoint_path}` (sha256 {checkpoint['sha256'][:12]}, step {checkpoint['step']}), "
             f"{metrics['color']} frames, {metrics['pairs']} pairs.", "",
             copy_verdict(metrics), "",
             *([drawing_verdict(metrics), ""] if drawing_verdict(metrics) else []),
             *([probe_verdict(metrics["actions"]["move"], "paddle's move"), ""]
               if (metrics.get("actions") or {}).get("move") else []),
             "Seed success criteria: " + " ".join(criteria_lines(metrics)), "",
             reconstruction_section(metrics), codebook_section(metrics), elements_section(metrics),
             events_section(metrics), actions_section(metrics)]
    if others:
        parts += ["## Splits side by side", "", summary_table(sorted([metrics, *others], key=split_rank)), "",
                  "Also in `../summary.md`.", ""]
    path = out / "report.md"
    atomic_write_bytes(path, "\n".join(parts).encode())
    return path


def sibling_metrics(root: Path) -> list[dict]:
    """The evaluations in `root/*/metrics.json`: a shared reports/ folder also holds other tools'
    metrics.json (a rollout's in reports/play, a controller's), which are no split's and are left out."""
    found = []
    for path in sorted(Path(root).glob("*/metrics.json")):
        try:
            metrics = json.loads(path.read_text())
        except (OSError, ValueError):           # ValueError: bad JSON, and bytes that are not UTF-8
            continue
        if is_evaluation(metrics):
            metrics["_dir"] = path.parent.name
            found.append(metrics)
    return found


def is_evaluation(metrics) -> bool:
    """An evaluate.py metrics.json: one that says so (`format`), or one from before it did that has
    every field the summary reads."""
    if not isinstance(metrics, dict):
        return False
    if "format" in metrics:
        return metrics["format"] == EVALUATION_FORMAT
    checkpoint, codebook = metrics.get("checkpoint"), metrics.get("codebook")
    return (metrics.get("split") in SPLIT_ORDER and isinstance(metrics.get("pairs"), int)
            and all(isinstance(metrics.get(part), dict) for part in ("model", "copy_baseline"))
            and isinstance(checkpoint, dict) and isinstance(checkpoint.get("sha256"), str)
            and isinstance(codebook, dict) and "used_fraction" in codebook)


def split_rank(metrics: dict) -> tuple:
    return SPLIT_ORDER.get(metrics["split"], 9), metrics.get("_dir", "")


def summary_table(all_metrics: list[dict]) -> str:
    rows = []
    for m in all_metrics:
        move = (m.get("actions") or {}).get("move") or {}
        rows.append([m.get("_dir", m["split"]), m["split"], m["pairs"], m["checkpoint"]["sha256"][:12],
                     num(m["model"]["psnr"]), num(m["copy_baseline"]["psnr"]),
                     num(m["model"]["psnr_changed"]), num(m["copy_baseline"]["psnr_changed"]),
                     num(m["model"]["ssim"], 4), num(m["delta_psnr"]), pct(m["codebook"]["used_fraction"]),
                     num(m["codebook"]["perplexity"], 1), pct(move.get("codes_linear")), pct(move.get("codes_mlp")),
                     pct(move.get("frame_t")), pct(move.get("pixel_diff"))])
    return table(["report", "split", "pairs", "checkpoint", "PSNR", "copy PSNR", "PSNR changed", "copy changed",
                  "SSIM", "ΔPSNR", "codes used", "perplexity", "move: codes linear", "codes MLP",
                  "frame t", "pixel diff"], rows)


def write_summary(root: Path) -> Path | None:
    """`root/summary.md`: every `root/*/metrics.json` side by side, and how far the splits differ."""
    found = sorted(sibling_metrics(root), key=split_rank)
    if not found:
        return None
    lines = ["# Evaluation summary", "", "Every split evaluated under this folder, side by side "
             "(PSNR in dB; 'changed' = PSNR on the pixels that change between t and t+1).", "",
             summary_table(found), ""]
    same_model = {m["checkpoint"]["sha256"] for m in found}
    psnrs = [m["model"]["psnr"] for m in found if m["model"]["psnr"] is not None]
    if len(found) > 1 and len(same_model) == 1 and psnrs:
        spread = max(psnrs) - min(psnrs)
        lines += [f"Across splits the model's PSNR varies by {spread:.2f} dB "
                  f"({'consistent' if spread <= 1.0 else 'not consistent'}: within 1 dB counts as consistent).", ""]
    elif len(same_model) > 1:
        lines += ["These reports come from different checkpoints; compare rows of the same checkpoint only.", ""]
    beaten = [m["_dir"] for m in found if m["model"]["psnr"] is not None and m["copy_baseline"]["psnr"] is not None
              and m["model"]["psnr"] <= m["copy_baseline"]["psnr"]]
    if beaten:
        lines += [f"The model does not beat copying frame t on: {', '.join(beaten)}.", ""]
    path = Path(root) / "summary.md"
    atomic_write_bytes(path, "\n".join(lines).encode())
    return path


# ------------------------------------------------------------------------------------ headline
def headline(metrics: dict) -> str:
    model, copy = metrics["model"], metrics["copy_baseline"]
    parts = [f"PSNR {num(model['psnr'])} dB (copy frame t: {num(copy['psnr'])})",
             f"SSIM {num(model['ssim'])} (copy: {num(copy['ssim'])})",
             f"changed pixels {num(model['psnr_changed'])} dB (copy: {num(copy['psnr_changed'])})",
             f"ΔPSNR {num(metrics['delta_psnr'])} dB",
             f"codes used {pct(metrics['codebook']['used_fraction'], 0)}, "
             f"perplexity {num(metrics['codebook']['perplexity'], 1)}"]
    paddle, ball = (metrics["elements"][name] for name in ("paddle", "ball"))
    parts.append(f"paddle within 2 px {pct(paddle['model']['within_2px'], 0)} "
                 f"(copy {pct(paddle['copy_baseline']['within_2px'], 0)}), missing {pct(paddle['model']['missing'], 0)}; "
                 f"ball within 2 px {pct(ball['model']['within_2px'], 0)} (copy {pct(ball['copy_baseline']['within_2px'], 0)}), "
                 f"missing {pct(ball['model']['missing'], 0)}")
    move = (metrics.get("actions") or {}).get("move")
    if move:
        parts.append(f"paddle move from codes {pct(move['codes_linear'], 0)} linear / {pct(move['codes_mlp'], 0)} MLP "
                     f"(frame t alone {pct(move['frame_t'], 0)}, pixel difference {pct(move['pixel_diff'], 0)}, "
                     f"majority {pct(move['majority'], 0)})")
    bins = (metrics.get("actions") or {}).get("move_bins")
    if bins:
        parts.append(f"paddle displacement (5 bins) from codes {pct(bins['codes_linear'], 0)} linear "
                     f"(pixel difference {pct(bins['pixel_diff'], 0)}, majority {pct(bins['majority'], 0)})")
    return "; ".join(parts)
