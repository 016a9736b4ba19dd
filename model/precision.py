"""Which precision inference runs in (extraction, evaluation; the rule for rollouts and the play page).

Training's `amp=auto` takes bf16 wherever it is native (model/inference.autocast_dtype): a step
that rounds a little differently still trains. Inference writes codes that downstream models learn
from and frames that are scored, so there `auto` takes bf16 only where both hold:

1. the hardware runs bf16 natively (a GPU that supports it; a CPU with avx512_bf16 or AMX):
   emulated bf16 ran the demo model's encode + decode 5x slower than fp32 on an AVX2 CPU;
2. bf16 is faithful *for this checkpoint*: on a sample of held-out pairs its codes equal fp32's in
   at least CODE_AGREEMENT of the cells, and its predicted frames score within PSNR_GAP_DB of fp32's
   PSNR against the true frame t+1 (`Agreement`).

Faithfulness depends on the weights (an FSQ code flips when a projection sits near a rounding
boundary), so it is measured per run on the machine that will do the work, and only where (1)
already holds: elsewhere the answer is fp32 at no cost. The demo model passes (99.90 % of cells,
0.002 dB; BENCHMARKS.md "Stages"), so on native hardware it runs in bf16.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable

import torch

from common.device import cpu_native_bf16
from common.distributed import Ranks
from model.inference import AMP_MODES, CheckpointIdentity, autocast

CODE_AGREEMENT = 0.995          # share of code cells bf16 must give exactly as fp32 does
PSNR_GAP_DB = 0.1               # |PSNR(bf16 prediction) - PSNR(fp32 prediction)|, against the true t+1, below this
AGREEMENT_PAIRS = 256           # pairs of the sample the check runs on (seconds on native hardware)
AGREEMENT_SPLITS = ("test", "val", "train")   # the first with pairs is sampled: held out where there is one
NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", None: "fp32"}


@dataclass(frozen=True)
class Agreement:
    """How closely low-precision inference follows fp32 on a sample of pairs."""

    pairs: int
    code_cells: float           # share of code cells (grid cells, plus the per-frame action code) equal to fp32's
    psnr_fp32: float            # dB: fp32 encode + decode against the true frame t+1
    psnr_low: float             # dB: the same end to end in low precision
    psnr_between: float         # dB: the low-precision prediction against the fp32 one (how alike the frames are)

    @property
    def gap_db(self) -> float:
        return abs(self.psnr_low - self.psnr_fp32)

    @property
    def passes(self) -> bool:
        return self.code_cells >= CODE_AGREEMENT and self.gap_db < PSNR_GAP_DB

    def describe(self) -> str:
        return (f"codes {self.code_cells:.2%} equal (bar {CODE_AGREEMENT:.1%}), PSNR {self.gap_db:.3f} dB apart "
                f"(bar {PSNR_GAP_DB} dB) on {self.pairs} pairs")


@dataclass(frozen=True)
class Precision:
    """The autocast dtype inference runs in (None: fp32) and why, for the first lines of a log."""

    dtype: torch.dtype | None
    reason: str
    agreement: Agreement | None = None

    @property
    def name(self) -> str:
        return NAMES[self.dtype]

    def describe(self) -> str:
        return f"{self.name} ({self.reason})"


def native_bf16(device: torch.device) -> str | None:
    """What gives `device` native bf16 ("GPU", or the CPU flag), or None."""
    if device.type == "cuda":
        return "GPU" if torch.cuda.is_bf16_supported() else None
    return cpu_native_bf16()


def precision_rule(amp: str, native: str | None, agreement: Callable[[], Agreement]) -> Precision:
    """The rule (module docstring): an explicit `amp` is obeyed; `auto` is bf16 only where `native`
    names native bf16 and `agreement()` (called only then) passes the bars, fp32 otherwise."""
    if amp not in AMP_MODES:
        raise ValueError(f"amp must be one of {', '.join(AMP_MODES)}, got {amp!r}")
    if amp != "auto":
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}[amp]
        return Precision(dtype, f"--amp {amp}")
    if not native:
        return Precision(None, "auto: no native bf16 here (avx512_bf16, AMX or a GPU with bf16); emulated bf16 "
                               "is slower than fp32")
    measured = agreement()
    if measured.passes:
        return Precision(torch.bfloat16, f"auto: native bf16 ({native}) and faithful: {measured.describe()}", measured)
    return Precision(None, f"auto: native bf16 ({native}) but not faithful enough: {measured.describe()}", measured)


@torch.inference_mode()
def measure_agreement(lam, batches: Iterable[dict], device: torch.device,
                      dtype: torch.dtype = torch.bfloat16) -> Agreement:
    """fp32 against `dtype` autocast on `batches` ({"cur", "next"} and "prev" with context): the
    codes each writes, and each one's end-to-end prediction (its own codes, decoded) against the
    true frame t+1. PSNR over the whole sample (summed squared errors, as evaluation does)."""
    equal = cells = pixels = 0
    squared = {"fp32": 0.0, "low": 0.0, "between": 0.0}
    pairs = 0
    for batch in batches:
        cur, nxt, prev = batch["cur"], batch["next"], batch.get("prev")
        outputs = {}
        for name, context in (("fp32", autocast(device, None)), ("low", autocast(device, dtype))):
            with context:
                grid, action = lam.encode_both(cur, nxt, prev)
                pred = lam.decode(cur, grid, prev, action).float().clamp(0, 1)
            outputs[name] = (grid, action, pred)
        (grid, action, pred), (grid_low, action_low, pred_low) = outputs["fp32"], outputs["low"]
        equal += int((grid == grid_low).sum()) + (0 if action is None else int((action == action_low).sum()))
        cells += grid.numel() + (0 if action is None else action.numel())
        for name, (a, b) in (("fp32", (pred, nxt)), ("low", (pred_low, nxt)), ("between", (pred_low, pred))):
            squared[name] += float((a - b.float()).pow(2).sum(dtype=torch.float64))
        pixels += nxt.numel()
        pairs += len(cur)
    if not pairs:
        raise ValueError("no pairs to measure agreement on")
    psnr = {name: math.inf if total == 0 else 10 * math.log10(pixels / total) for name, total in squared.items()}
    return Agreement(pairs, equal / cells, psnr["fp32"], psnr["low"], psnr["between"])


def agreement_batches(shards, manifest: dict, *, grayscale: bool, context: int, device: torch.device,
                      pairs: int = AGREEMENT_PAIRS, batch_size: int = 64, threads: int | None = None):
    """A loader over a fixed sample of `pairs` pairs spread over every episode of the first split of
    AGREEMENT_SPLITS that has pairs (the same sample on every run and rank)."""
    from pipeline.loader import build_loader, default_backend

    split = next(name for name in AGREEMENT_SPLITS if manifest["splits"].get(name, {}).get("pairs"))
    return build_loader(shards, split, batch_size, grayscale=grayscale, shuffle=False, drop_last=False,
                        backend=default_backend(), device=device, cache=False, context=context, sample=pairs,
                        manifest=manifest, threads=threads)


def decide_precision(amp: str, lam, identity: CheckpointIdentity, shards, manifest: dict, device: torch.device,
                     ranks: Ranks, loader_threads: int, command: str) -> Precision:
    """The rule for a command over pair shards (extraction, evaluation), printed by rank 0. Every rank
    measures the same sample, and unless all of them chose the same precision all run fp32: one run
    writes codes, and scores frames, of one precision."""
    def agreement() -> Agreement:
        batches = agreement_batches(shards, manifest, grayscale=identity.color == "gray", context=identity.context,
                                    device=device, threads=loader_threads)
        return measure_agreement(lam, batches, device)

    precision = precision_rule(amp, native_bf16(device), agreement)
    if len(set(ranks.all_gather(precision.name))) > 1:
        precision = Precision(None, "the ranks disagree on bf16: fp32 on all of them")
    if ranks.main:
        print(f"{command}: precision {precision.describe()}", flush=True)
    return precision
