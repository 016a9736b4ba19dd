"""Evaluate a trained latent action model on one split: metrics.json, report.md and figures.

    python evaluate.py --shards shards/pairs --checkpoint checkpoints/latent_action/best.pt \
        [--split test] [--out reports/test]

One batched pass over every pair of the split (the project loader, manifest order) scores the
model's prediction of frame t+1 beside copying frame t and beside decoding random codes, counts code
use, and detects ball, paddle and bricks in the true and predicted frames (evaluation/events.py).
Then: codes by gameplay event (NMI, evaluation/code_analysis.py), the action probes
(evaluation/probes.py; fitted on the train split, whose codes come from the latent shards when they
were extracted by this checkpoint), figures, and the report. `reports/summary.md` puts every split
evaluated so far side by side. Conventions are DESIGN.md's ("Evaluation"); see evaluation/metrics.py.
"""
from __future__ import annotations

import argparse
import heapq
import io
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from tqdm import tqdm

from common.cli import add_config_flags, config_values, flag
from common.device import resolve_device
from common.errors import UserError, check_output_dir, run_cli
from evaluation.code_analysis import event_code_analysis
from evaluation.events import Elements, count_events, detect_elements, transition_events
from evaluation.figures import Example, code_tsne, codebook_histogram, codes_by_event, reconstruction_grid
from evaluation.formatting import num, pct
from evaluation.metrics import ElementMeter, ReconstructionMeter, code_counts, codebook_stats
from evaluation.probes import ProbeSet, action_label, action_probes, move_label, pooled
from evaluation.report import write_report, write_summary
from model.inference import CheckpointIdentity, autocast, codes_to_array, load_model
from pipeline.frames import to_model_input
from pipeline.loader import in_order_loader
from pipeline.pair_index import PreviousFrames, build_pair_index, episode_and_step
from pipeline.shards import (LATENT_FORMAT, PAIRS_FORMAT, SPLITS, atomic_write_json, load_manifest, read_members,
                             split_shards)
from pipeline.stream import decode_png

EXAMPLES = 6                   # pairs in the reconstruction grid


# ------------------------------------------------------------------------------------ reading
def read_metas(entries: Sequence[dict]) -> dict[str, dict]:
    return {key: json.loads(m["json"]) for key, m in read_members(entries, ("json",)).items()}


# ------------------------------------------------------------------------------------ the pass
@dataclass
class SplitPass:
    """Everything one pass over the split collects."""

    model: ReconstructionMeter
    copy: ReconstructionMeter
    random: ReconstructionMeter
    model_elements: ElementMeter = field(default_factory=ElementMeter)
    copy_elements: ElementMeter = field(default_factory=ElementMeter)
    keys: list = field(default_factory=list)
    codes: list = field(default_factory=list)                # uint8 (B, 7, 5) per batch
    frame_features: list = field(default_factory=list)       # float (B, f) per batch: frame t, pooled
    diff_features: list = field(default_factory=list)        # float (B, f) per batch: t+1 - t, pooled
    cur_elements: list = field(default_factory=list)
    next_elements: list = field(default_factory=list)
    examples: list = field(default_factory=list)             # heap of (changed pixels, n, Example)



def evaluate_pass(loader, lam, device: torch.device, seed: int, progress: bool) -> SplitPass:
    # random codes serve ΔPSNR only: no SSIM for them
    state = SplitPass(ReconstructionMeter(device), ReconstructionMeter(device), ReconstructionMeter(device, ssim=False))
    generator = torch.Generator().manual_seed(seed)           # random codes for ΔPSNR, the same every run
    size = lam.config.codebook_size
    for batch in tqdm(loader, desc="evaluate", unit="batch", disable=not progress):
        cur, nxt, prev = batch["cur"], batch["next"], batch.get("prev")
        with torch.inference_mode(), autocast(device):
            codes = lam.encode(cur, nxt, prev)
            pred = lam.decode(cur, codes, prev).float().clamp(0, 1)
            random_codes = torch.randint(0, size, codes.shape, generator=generator).to(device)
            pred_random = lam.decode(cur, random_codes, prev).float().clamp(0, 1)
        state.model.update(pred, nxt, cur)
        state.copy.update(cur, nxt, cur)
        state.random.update(pred_random, nxt, cur)
        state.keys += batch["key"]
        state.codes.append(codes_to_array(codes))
        state.frame_features.append(pooled(cur))
        state.diff_features.append(pooled(nxt.float() - cur.float()))
        collect_elements(state, cur.cpu().numpy(), nxt.cpu().numpy(), pred.cpu().numpy(), batch["key"])
    return state


def collect_elements(state: SplitPass, cur: np.ndarray, nxt: np.ndarray, pred: np.ndarray, keys: list[str]) -> None:
    for key, frame_t, frame_next, frame_pred in zip(keys, cur, nxt, pred):
        elements_t, elements_next = detect_elements(frame_t), detect_elements(frame_next)
        state.model_elements.update(detect_elements(frame_pred), elements_next, elements_t)
        state.copy_elements.update(elements_t, elements_next, elements_t)
        state.cur_elements.append(elements_t)
        state.next_elements.append(elements_next)
        example = Example.of(key, frame_t, frame_next, frame_pred)
        # the pairs where most pixels change: where copying fails and the codes must carry the change
        item = (example.changed_pixels, len(state.cur_elements), example)       # the count breaks ties
        if len(state.examples) < EXAMPLES:
            heapq.heappush(state.examples, item)
        else:
            heapq.heappushpop(state.examples, item)


# ------------------------------------------------------------------------------------ events
def split_events(keys: Sequence[str], cur: Sequence[Elements], nxt: Sequence[Elements], metas: dict[str, dict]):
    """Gameplay events of every pair; a bounce needs frame t-1, taken from the pair (episode, t-1)."""
    position = {episode_and_step(key): i for i, key in enumerate(keys)}
    events = []
    for i, key in enumerate(keys):
        where = episode_and_step(key)
        before = position.get((where[0], where[1] - 1)) if where else None
        events.append(transition_events(cur[before] if before is not None else None, cur[i], nxt[i], metas.get(key)))
    return events


# ------------------------------------------------------------------------------------ actions
def latent_codes(latent_dir: Path | None, identity: CheckpointIdentity, keys: set[str]) -> dict[str, np.ndarray] | None:
    """Codes of `keys` from the train split's latent shards, if they were made by this checkpoint."""
    if latent_dir is None or not (latent_dir / "manifest.json").is_file():
        return None
    manifest = load_manifest(latent_dir, LATENT_FORMAT)
    if manifest.get("checkpoint", {}).get("sha256") != identity.sha256 or "train" not in manifest["splits"]:
        return None
    members = read_members(split_shards(latent_dir, manifest, "train"), ("codes.npy",), keys)
    return {key: np.load(io.BytesIO(m["codes.npy"]), allow_pickle=False) for key, m in members.items()}


def train_probe_set(shards: Path, manifest: dict, lam, identity: CheckpointIdentity, device: torch.device,
                    latent_dir: Path | None, limit: int, batch_size: int) -> tuple[ProbeSet, str] | None:
    """At most `limit` labelled train pairs (spread evenly over the split) for the probes, and where
    their codes came from. None when the train split has no labels."""
    entries = split_shards(shards, manifest, "train")
    metas = read_metas(entries)
    chosen = [key for key, meta in metas.items() if move_label(meta) is not None or action_label(meta) is not None]
    if not chosen:
        return None
    chosen = [chosen[i] for i in np.linspace(0, len(chosen) - 1, min(limit, len(chosen))).astype(int)]
    stored = latent_codes(latent_dir, identity, set(chosen))
    source = "latent shards" if stored is not None and len(stored) == len(chosen) else "encoded now"
    members = read_members(entries, ("cur.png", "next.png"), set(chosen))
    if source == "encoded now" and identity.context:          # frame t-1 sits in another pair's members
        previous = PreviousFrames(build_pair_index(shards, "train"))
        for key in chosen:
            members[key]["prev.png"] = previous.png(key)[0]
        previous.close()
    gray = identity.color == "gray"

    def frames(keys: list[str], member: str) -> torch.Tensor:
        decoded = torch.stack([decode_png(members[key][member]) for key in keys])
        return to_model_input(decoded.to(device), grayscale=gray)

    def batches():
        for start in range(0, len(chosen), batch_size):
            keys = chosen[start:start + batch_size]
            cur, nxt = frames(keys, "cur.png"), frames(keys, "next.png")
            if source == "latent shards":
                codes = np.stack([stored[k] for k in keys])
            else:
                prev = frames(keys, "prev.png") if identity.context else None
                with torch.inference_mode(), autocast(device):
                    codes = codes_to_array(lam.encode(cur, nxt, prev))
            yield codes, cur, nxt, [metas[k] for k in keys]

    return ProbeSet.collect(batches()), source


def actions_section(state: SplitPass, codes: np.ndarray, metas: dict[str, dict], train: tuple[ProbeSet, str] | None,
                    codebook: np.ndarray, seed: int) -> dict | None:
    if train is None:
        return None
    test = ProbeSet(codes, np.concatenate(state.frame_features), np.concatenate(state.diff_features),
                    [metas.get(key, {}) for key in state.keys])
    result = action_probes(train[0], test, codebook, seed)
    return None if result is None else {**result, "train_codes_from": train[1]}


# ------------------------------------------------------------------------------------ metrics
def elements_section(state: SplitPass) -> dict:
    model, copy = state.model_elements.compute(), state.copy_elements.compute()
    return {name: {"model": model[name], "copy_baseline": copy[name]} for name in model}


def build_metrics(split: str, state: SplitPass, identity: CheckpointIdentity, codes: np.ndarray,
                  codebook_size: int, events, event_analysis: dict, actions: dict | None) -> dict:
    model, random = state.model.compute(), state.random.compute()
    delta = None if model["psnr"] is None or random["psnr"] is None else model["psnr"] - random["psnr"]
    metrics = {"split": split, "pairs": len(state.keys), "color": identity.color,
               "checkpoint": {"sha256": identity.sha256, "step": identity.step},
               "model": model, "copy_baseline": state.copy.compute(),
               "delta_psnr": delta,
               "codebook": codebook_stats(code_counts(codes, codebook_size)),
               "elements": elements_section(state),
               "random_codes": random,
               "events": {"counts": count_events(events), "codes": event_analysis}}
    if actions is not None:
        metrics["actions"] = actions
    return metrics


# ------------------------------------------------------------------------------------ figures
def draw_figures(out: Path, state: SplitPass, lam, metrics: dict, seed: int) -> dict[str, str]:
    counts = metrics["codebook"]["counts"]
    examples = [example for _, _, example in sorted(state.examples, key=lambda item: -item[0])]
    paths = {"codebook_histogram": codebook_histogram(counts, out / "codebook_histogram.png",
                                                      f"code use, {metrics['split']} ({metrics['pairs']} pairs)"),
             "code_tsne": code_tsne(lam.codebook.float().cpu().numpy(), counts, out / "code_tsne.png", seed),
             "reconstructions": reconstruction_grid(examples, out / "reconstructions.png"),
             "codes_by_event": codes_by_event(metrics["events"]["codes"], out / "codes_by_event.png")}
    return {name: path.name for name, path in paths.items()}


# ------------------------------------------------------------------------------------ the run
@dataclass
class EvaluateConfig:
    shards: Path = flag(help="pair shard directory (lam-pairs/1)")
    checkpoint: Path = flag(help="LAM checkpoint")
    split: str = flag("test", choices=SPLITS)
    out: Path | None = flag(None, "report directory (default reports/<split>)")
    batch_size: int = 64
    latent: Path | None = flag(Path("shards/latent"), "latent shards whose train codes the action probe may reuse "
                                                      "(if this checkpoint made them)")
    probe_limit: int = flag(1500, "train transitions for the action probe")
    seed: int = flag(0, "random codes for ΔPSNR, t-SNE, probes")
    device: str | None = flag(None, "auto (default), cpu or cuda")
    backend: str | None = flag(None, "data loader (default: dali where installed)", choices=("dali", "torch"))
    progress: bool = True

    def __post_init__(self):
        if self.batch_size < 1:
            raise UserError(f"--batch-size must be at least 1, got {self.batch_size}")
        self.out = self.out or Path("reports") / self.split


def evaluate(cfg: EvaluateConfig) -> tuple[dict, Path]:
    started = time.perf_counter()
    check_output_dir(cfg.out, "--out")                      # not after the whole pass
    manifest = load_manifest(cfg.shards, PAIRS_FORMAT)
    entries = split_shards(cfg.shards, manifest, cfg.split)
    device = resolve_device(cfg.device)
    lam, identity = load_model(cfg.checkpoint, device)
    loader = in_order_loader(cfg.shards, cfg.split, cfg.batch_size, grayscale=identity.color == "gray",
                             backend=cfg.backend, device=device, context=identity.context)
    if len(loader) == 0:
        raise UserError(f"{cfg.shards}: split {cfg.split!r} has no pairs")
    state = evaluate_pass(loader, lam, device, cfg.seed, cfg.progress)
    codes = np.concatenate(state.codes)
    metas = read_metas(entries)
    events = split_events(state.keys, state.cur_elements, state.next_elements, metas)
    analysis = event_code_analysis(codes, events)
    train = train_probe_set(cfg.shards, manifest, lam, identity, device, cfg.latent, cfg.probe_limit,
                            cfg.batch_size) if "train" in manifest["splits"] else None
    actions = actions_section(state, codes, metas, train, lam.codebook.float().cpu().numpy(), cfg.seed)
    metrics = build_metrics(cfg.split, state, identity, codes, lam.config.codebook_size, events, analysis, actions)
    cfg.out.mkdir(parents=True, exist_ok=True)
    figures = draw_figures(cfg.out, state, lam, metrics, cfg.seed)
    metrics["seconds"] = round(time.perf_counter() - started, 1)
    atomic_write_json(cfg.out / "metrics.json", metrics)
    report = write_report(cfg.out, metrics, figures, checkpoint_path=str(cfg.checkpoint))
    write_summary(cfg.out.parent)
    return metrics, report


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


# ------------------------------------------------------------------------------------ cli
def cli(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Evaluate a latent action model on one split.")
    add_config_flags(parser, EvaluateConfig)
    metrics, report = evaluate(EvaluateConfig(**config_values(parser.parse_args(argv), EvaluateConfig)))
    print(f"{metrics['split']}: {metrics['pairs']} pairs in {metrics['seconds']} s; {headline(metrics)}")
    print(f"report: {report}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry; returns the exit code (a user's mistake: one `error:` line on stderr, 2)."""
    return run_cli(cli, argv)


if __name__ == "__main__":
    sys.exit(main())
