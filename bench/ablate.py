"""Ablation of the model options that decide whether the codes carry the action (`make ablate`).

Each variant trains the `demo` preset on the same pair shards (--set for its options), then
evaluate.py scores it on the val split (never test: the default is chosen here). Writes
reports/ablation/ablation.json and ablation.md.

    python -m bench.ablate [--shards shards/pairs] [--iters 2000] [--only NAME ...] [--set field=value ...]

`--set` adds train.py settings to every variant (e.g. `--set context=1`: each with frame t-1).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from common.errors import check_output_dir, run_cli
from bench.common import ROOT, machine, markdown_table

SEED = ["encoder_input=pair", "decoder_skips=false", "latent_every_stage=false", "residual_output=false",
        "changed_pixel_weight=1"]
SKIPS = ["decoder_skips=true", "residual_output=true"]
VARIANTS: dict[str, list[str]] = {
    "seed-literal (no skips, sigmoid, plain MSE, encoder sees t and t+1)": SEED,
    "+ decoder frame-t skips, residual output": [*SEED, *SKIPS],
    "+ changed pixels x10": [*SEED, *SKIPS, "changed_pixel_weight=10"],
    "+ encoder sees [t, t+1 - t], codes at every stage": [*SEED, *SKIPS, "changed_pixel_weight=10",
                                                          "encoder_input=pair_difference", "latent_every_stage=true"],
    "default: encoder sees t+1 - t only, codes at every stage": [],
    "default + frame t-1 as context (encoder and decoder)": ["context=1"],
}


def run_variant(name: str, settings: list[str], shards: Path, out: Path, iters: int) -> dict:
    import evaluate
    import train

    slug = "".join(c if c.isalnum() else "-" for c in name)[:60].strip("-")
    root = out / slug
    args = ["--shards", str(shards), "--preset", "demo", "--iters", str(iters), "--out", str(root / "ckpt"),
            "--run-dir", str(root / "run"), "--wandb", "disabled"]
    for setting in settings:
        args += ["--set", setting]
    started = time.perf_counter()
    assert train.main(args) == 0, f"training {name} failed"
    seconds = time.perf_counter() - started
    metrics, _ = evaluate.evaluate(evaluate.EvaluateConfig(shards, root / "ckpt" / "best.pt", "val", root / "val",
                                                           latent=None, progress=False))
    return {"name": name, "settings": settings, "train_seconds": seconds, "iters": iters, "metrics": metrics}


def row(result: dict) -> list:
    m = result["metrics"]
    pct = lambda v: "n/a" if v is None else f"{v:.0%}"  # noqa: E731
    num = lambda v, d=2: "n/a" if v is None else f"{v:.{d}f}"  # noqa: E731
    move = (m.get("actions") or {}).get("move") or {}
    ball = m["elements"]["ball"]["model"]
    return [result["name"], f"{num(m['model']['psnr'])} / {num(m['copy_baseline']['psnr'])}",
            f"{num(m['model']['ssim'], 3)} / {num(m['copy_baseline']['ssim'], 3)}",
            f"{num(m['model']['psnr_changed'])} / {num(m['copy_baseline']['psnr_changed'])}",
            pct(ball.get("within_2px")), pct(ball.get("spurious")), pct(m["codebook"]["used_fraction"]),
            pct(move.get("codes_linear")), pct(move.get("codes_mlp")), pct(move.get("frame_t")),
            pct(move.get("pixel_diff")), pct(move.get("majority")),
            f"{result['iters'] / result['train_seconds']:.2f}"]


HEADER = ["variant", "PSNR / copy", "SSIM / copy", "changed-pixel PSNR / copy", "ball within 2 px", "spurious ball",
          "codes used", "move: codes linear", "codes MLP", "frame t", "pixel diff", "majority", "steps/s (incl. val)"]


def main(argv: list[str] | None = None) -> int:
    return run_cli(cli, argv)


def cli(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=Path, default=ROOT / "shards" / "pairs")
    parser.add_argument("--out", type=Path, default=ROOT / "reports" / "ablation")
    parser.add_argument("--iters", type=int, default=2000)
    parser.add_argument("--only", nargs="*", help="variant names (substrings) to run")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="a train.py setting added to every variant (repeatable)")
    args = parser.parse_args(argv)
    check_output_dir(args.out, "--out")
    chosen = {n: [*s, *args.set] for n, s in VARIANTS.items() if not args.only or any(o in n for o in args.only)}
    args.out.mkdir(parents=True, exist_ok=True)
    results = [run_variant(name, settings, args.shards, args.out, args.iters) for name, settings in chosen.items()]
    (args.out / "ablation.json").write_text(json.dumps(results, indent=2, default=str))
    common = f" Every variant with `--set {' '.join(args.set)}`." if args.set else ""
    text = (f"# Ablation: do the codes carry the action?\n\n`demo` preset, {args.iters} steps, val split of "
            f"`{args.shards}`;{common} {machine()}.\n\n" + markdown_table(HEADER, [row(r) for r in results]) + "\n")
    (args.out / "ablation.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
