"""Evaluate a trained latent action model on one split: metrics.json, report.md and figures
(DESIGN.md, "Evaluation"), by one process or by every rank torchrun starts.

    metrics, report = evaluate(EvaluateConfig(shards=Path("shards/pairs"), checkpoint=Path("best.pt")))

One batched pass over every pair of the split (evaluation/split_pass.py; under torchrun each rank
scores whole batches of it, and the meters' sums are reduced across ranks), in the precision
model/precision.py's rule picks (fp32 unless bf16 is native and faithful), the model and the
scoring side by side in threads of their own; then, on rank 0 alone:
codes by gameplay event (NMI), the action probes (fitted on the train split), figures, the report
and `reports/summary.md` with every split evaluated so far side by side.
"""
from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from common.cli import MAX_BATCH, MAX_SEED, MAX_THREADS, check_fields, flag
from common.device import model_threads, torch_threads
from common.distributed import hold_on_main, process_group
from common.errors import UserError, check_output_dir
from common.lock import FolderLock
from common.provenance import provenance
from evaluation.code_analysis import event_code_analysis
from evaluation.events import Elements, count_events, transition_events
from evaluation.figures import code_tsne, codebook_histogram, codes_by_event, reconstruction_grid
from evaluation.metrics import code_counts, codebook_stats
from evaluation.probe_data import actions_section, read_metas, train_probe_set
from evaluation.probes import ProbeSet
from evaluation.report import EVALUATION_FORMAT, write_report, write_summary
from evaluation.split_pass import Share, batch_share, evaluate_pass, random_codes
from model.inference import AMP_MODES, CheckpointIdentity, inference_layout, load_model
from model.precision import decide_precision
from pipeline.loader import announce_backend, in_order_loader
from pipeline.pair_index import episode_and_step
from pipeline.shards import PAIRS_FORMAT, SPLITS, atomic_write_json, load_manifest, pin_shard_dir, split_shards


@dataclass
class EvaluateConfig:
    shards: Path = flag(help="pair shard directory (lam-pairs/1)")
    checkpoint: Path = flag(help="LAM checkpoint")
    split: str = flag("test", choices=SPLITS)
    out: Path | None = flag(None, "report directory (default reports/<split>)")
    batch_size: int = flag(64, "pairs per batch, per rank", min=1, max=MAX_BATCH)
    latent: Path | None = flag(Path("shards/latent"), "latent shards whose train codes the action probe may reuse "
                                                      "(if this checkpoint made them)")
    probe_limit: int = flag(1500, "train transitions for the action probe", min=0)
    seed: int = flag(0, "random codes for ΔPSNR, t-SNE, probes", min=0, max=MAX_SEED)
    device: str | None = flag(None, "auto (default), cpu or cuda; under torchrun each rank its own GPU",
                              choices=("auto", "cpu", "cuda"))
    backend: str | None = flag(None, "data loader: auto (the default: dali where installed, else torch), dali or torch",
                               choices=("auto", "dali", "torch"))
    loader_threads: int | None = flag(None, "frame decoding threads (torch backend: worker processes) per rank "
                                            "(default: the machine's cores shared among its ranks)", min=1,
                                      max=MAX_THREADS)
    threads: int | None = flag(None, "CPU threads of the model, per rank (default: half the rank's cores, at least "
                                     "one; the rest score its predictions beside it)", min=1, max=MAX_THREADS)
    amp: str = flag("auto", "precision: auto (bf16 where native and faithful to fp32 for this checkpoint, "
                            "else fp32), bf16, fp16 or off (fp32)", choices=AMP_MODES)
    progress: bool = True

    def __post_init__(self):
        check_fields(self)                  # the flags' rules, for a config built in Python too
        self.out = self.out or Path("reports") / self.split


def evaluate(cfg: EvaluateConfig) -> tuple[dict | None, Path | None]:
    """(metrics, report path) on rank 0 (or the only process); (None, None) on the other ranks."""
    started = time.perf_counter()
    check_output_dir(cfg.out, "--out")                      # not after the whole pass
    # the shard set as it is now: a re-pack swapping in another meanwhile cannot mix the two
    cfg = dataclasses.replace(cfg, shards=pin_shard_dir(cfg.shards))
    manifest = load_manifest(cfg.shards, PAIRS_FORMAT)
    entries = split_shards(cfg.shards, manifest, cfg.split)
    pairs = sum(int(entry["pairs"]) for entry in entries)
    if pairs == 0:
        raise UserError(f"{cfg.shards}: split {cfg.split!r} has no pairs")
    lock = FolderLock(cfg.out)
    try:
        return evaluate_locked(cfg, manifest, entries, pairs, lock, started)
    finally:
        lock.release()


def evaluate_locked(cfg: EvaluateConfig, manifest: dict, entries: list[dict], pairs: int, lock: FolderLock,
                    started: float) -> tuple[dict | None, Path | None]:
    """The evaluation, on every rank; rank 0 holds --out's lock from before the pass to the last
    file it writes there."""
    with process_group(cfg.device) as (ranks, device):
        hold_on_main(ranks, lock)
        lam, identity = load_model(cfg.checkpoint, device)
        inference_layout(lam, device)
        loader_threads = cfg.loader_threads or ranks.cores
        precision = decide_precision(cfg.amp, lam, identity, cfg.shards, manifest, device, ranks, loader_threads,
                                     "evaluate")
        backend = announce_backend(cfg.backend, ranks.main, "evaluate")
        # the model's threads, and the scoring's (this thread's) the cores they leave
        threads = cfg.threads or model_threads(ranks.cores, beside=ranks.cores // 2)
        first, stop = batch_share(pairs, cfg.batch_size, ranks)
        loader = in_order_loader(cfg.shards, cfg.split, cfg.batch_size, grayscale=identity.color == "gray",
                                 backend=backend, device=device, context=identity.context,
                                 runs=[(first, stop)], manifest=manifest, threads=loader_threads)
        pass_started = time.perf_counter()
        with torch_threads(model_threads(ranks.cores, beside=threads) if device.type == "cpu" else None):
            state = evaluate_pass(loader, lam, device, first=first, progress=cfg.progress and ranks.main,
                                  random=random_codes(pairs, lam.config.codebook_size, cfg.seed),
                                  dtype=precision.dtype, model_threads=threads)
        scores = {name: meter.compute() for name, meter in                # collectives: on every rank
                  (("model", state.model), ("copy_baseline", state.copy), ("random_codes", state.random))}
        shares = ranks.gather(state.share)
        pass_seconds = time.perf_counter() - pass_started
    if not ranks.main:
        return None, None
    share = Share.joined(shares)
    codes = share.all_codes()
    metas = read_metas(entries)
    timings = {"pass": pass_seconds}
    clock = time.perf_counter()
    events = split_events(share.keys, share.cur_elements, share.next_elements, metas)
    with torch_threads(threads if device.type == "cpu" else None):
        train = train_probe_set(cfg.shards, manifest, lam, identity, device, cfg.latent, cfg.probe_limit,
                                cfg.batch_size, precision.dtype) if "train" in manifest["splits"] else None
    timings["probe_pairs"], clock = time.perf_counter() - clock, time.perf_counter()
    codebook = lam.codebook.float().cpu().numpy()
    test = ProbeSet(codes, np.concatenate(share.frame_features), np.concatenate(share.diff_features),
                    [metas.get(key, {}) for key in share.keys])
    # the pass is over: every core fits probes, one fit each
    actions = actions_section(test, train, codebook, cfg.seed, workers=os.cpu_count() or 1)
    timings["probes"], clock = time.perf_counter() - clock, time.perf_counter()
    metrics = build_metrics(cfg.split, share, scores, identity, codes, events, actions)
    trained_with = getattr(lam, "trained_with", {})         # where the figures come from (common/provenance.py)
    metrics["provenance"] = provenance(variant=lam.config.variant, preset=trained_with.get("preset"),
                                       trained_at=trained_with.get("commit"), precision=precision.name)
    cfg.out.mkdir(parents=True, exist_ok=True)
    figures = draw_figures(cfg.out, share, codebook, metrics, cfg.seed)
    timings["figures"] = time.perf_counter() - clock
    metrics["seconds"] = round(time.perf_counter() - started, 1)
    metrics["pass_seconds"] = round(pass_seconds, 1)          # of which the pass over the split (the rest: probes, figures)
    metrics["timings"] = {name: round(value, 1) for name, value in timings.items()}
    atomic_write_json(cfg.out / "metrics.json", metrics)
    report = write_report(cfg.out, metrics, figures, checkpoint_path=str(cfg.checkpoint))
    write_summary(cfg.out.parent)
    return metrics, report


def split_events(keys: Sequence[str], cur: Sequence[Elements], nxt: Sequence[Elements], metas: dict[str, dict]):
    """Gameplay events of every pair; a bounce needs frame t-1, taken from the pair (episode, t-1)."""
    position = {episode_and_step(key): i for i, key in enumerate(keys)}
    events = []
    for i, key in enumerate(keys):
        where = episode_and_step(key)
        before = position.get((where[0], where[1] - 1)) if where else None
        events.append(transition_events(cur[before] if before is not None else None, cur[i], nxt[i], metas.get(key)))
    return events


def build_metrics(split: str, share: Share, scores: dict, identity: CheckpointIdentity, codes: np.ndarray,
                  events, actions: dict | None) -> dict:
    model, random = scores["model"], scores["random_codes"]
    delta = None if model["psnr"] is None or random["psnr"] is None else model["psnr"] - random["psnr"]
    model_elements, copy_elements = share.model_elements.compute(), share.copy_elements.compute()
    metrics = {"format": EVALUATION_FORMAT, "split": split, "pairs": len(share.keys), "color": identity.color,
               "checkpoint": {"sha256": identity.sha256, "step": identity.step},
               "model": model, "copy_baseline": scores["copy_baseline"],
               "delta_psnr": delta,
               "codebook": codebook_stats(code_counts(codes, identity.codebook_size)),
               "elements": {name: {"model": model_elements[name], "copy_baseline": copy_elements[name]}
                            for name in model_elements},
               "random_codes": random,
               "events": {"counts": count_events(events), "codes": event_code_analysis(codes, events)}}
    if actions is not None:
        metrics["actions"] = actions
    return metrics


def draw_figures(out: Path, share: Share, codebook: np.ndarray, metrics: dict, seed: int) -> dict[str, str]:
    counts = metrics["codebook"]["counts"]
    paths = {"codebook_histogram": codebook_histogram(counts, out / "codebook_histogram.png",
                                                      f"code use, {metrics['split']} ({metrics['pairs']} pairs)"),
             "code_tsne": code_tsne(codebook, counts, out / "code_tsne.png", seed),
             "reconstructions": reconstruction_grid(share.examples.examples(), out / "reconstructions.png"),
             "codes_by_event": codes_by_event(metrics["events"]["codes"], out / "codes_by_event.png")}
    return {name: path.name for name, path in paths.items()}
