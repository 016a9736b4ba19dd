"""GPU check: what this project cannot measure on its CPU boxes, in one run of at most ~8 minutes on
one H100 with the machine's own torch (2.11+ works) and the wheels `make wheels` downloads.

    python -m bench.gpu_check [--out reports/gpu-check] [--steps 300]

1. the CUDA-marked tests (tests/test_cuda.py);
2. DALI "mixed" decoding against CPU decoding, byte for byte (skipped, and said, without DALI);
3. one bf16 autocast step and one fp16 GradScaler step;
4. the `full` preset from real shards, compiled and eager: steps/s, data-wait fraction, peak GPU
   memory, MFU;
5. the extraction rate.
Writes gpu-check.json and gpu-check.md into --out. On a machine whose Python has no torch, or whose
torch sees no CUDA GPU, it says so in one line and exits 2 (`--preflight`: only that check).
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

try:
    import torch
except Exception as error:          # noqa: BLE001 - no torch, or a broken one: main() says which, in one line
    torch, TORCH_IMPORT_ERROR = None, error

from common.cli import checked_type
from common.errors import check_output_dir, run_cli
from bench.common import ROOT, machine, markdown_table, pair_shards, recorded_videos

HOW_TO_RUN = "run it on the GPU machine with that machine's own Python: make gpu-check GPU_PY=/path/to/python3"


def cuda_problem() -> str | None:
    """What keeps this Python from running the check, in one line (None: nothing)."""
    if torch is None:
        reason = (str(TORCH_IMPORT_ERROR).strip().splitlines() or [type(TORCH_IMPORT_ERROR).__name__])[0]
        return f"{sys.executable} cannot import torch ({reason})"
    if not torch.cuda.is_available():
        return f"torch {torch.__version__} in {sys.executable} sees no CUDA GPU"
    return None


def has_dali() -> bool:
    try:
        import nvidia.dali  # noqa: F401
        return True
    except ImportError:
        return False


def cuda_tests() -> dict:
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "cuda", "tests/test_cuda.py"], cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    return {"exit_code": proc.returncode, "summary": (proc.stdout.strip().splitlines() or [""])[-1]}


def dali_mixed_vs_cpu(shards: Path) -> dict:
    if not has_dali():
        return {"skipped": "DALI is not installed here (its wheel is larger than one carry)"}
    from pipeline.loader import build_loader

    make = lambda device: build_loader(shards, "val", 32, shuffle=False, drop_last=False, backend="dali",  # noqa: E731
                                       device=device, cache=False)
    pairs = equal = 0
    for gpu, cpu in zip(make("cuda"), make("cpu")):
        pairs += gpu["cur"].shape[0]
        same = (gpu["cur"].cpu() == cpu["cur"]).flatten(1).all(1) & (gpu["next"].cpu() == cpu["next"]).flatten(1).all(1)
        equal += int(same.sum())
    return {"pairs": pairs, "identical": equal, "byte_for_byte": pairs == equal}


def mixed_precision_steps() -> dict:
    from model import LatentActionModel, ModelConfig
    from training.runtime import Runtime
    from training.step import TrainStep

    device, result = torch.device("cuda"), {}
    for name, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        model = LatentActionModel(ModelConfig()).to(device).train()
        step = TrainStep(model, torch.optim.Adam(model.parameters()), Runtime(0, 1, 0, device, dtype), grad_clip=1.0)
        cur = torch.rand(32, 1, 210, 160, device=device)
        outcome = step(iter([{"cur": cur, "next": cur.roll(1, dims=3)}]), 3e-4, 0)
        result[name] = {"loss": outcome.terms["loss"], "skipped": outcome.skipped,
                        "scaler": step.scaler.get_scale() if step.scaler.is_enabled() else None}
    return result


def full_preset_speed(shards: Path, steps: int, compile: bool) -> dict:
    """The trainer's own loader and TrainStep at the full preset; data wait = time in next(batches)."""
    from model import LatentActionModel
    from pipeline.loader import build_loader, default_backend
    from training.config import build_config
    from training.runtime import setup_runtime
    from training.step import TrainStep, learning_rate
    from training.throughput import Throughput

    cfg = build_config("full", flags={"shards": str(shards), "compile": compile, "backend": default_backend()})
    rt = setup_runtime("cuda", cfg.amp, cfg.seed, False, 0)
    model = LatentActionModel(cfg.model).to(rt.device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, fused=True)
    train_step = TrainStep(model, optimizer, rt, grad_clip=cfg.grad_clip, compile=compile)
    loader = build_loader(shards, "train", cfg.batch_size, backend=cfg.backend, device=rt.device)
    batches, waited = iter(()), 0.0

    def timed_batches():
        nonlocal batches, waited
        while True:
            started = time.perf_counter()
            try:
                batch = next(batches)
            except StopIteration:
                batches = iter(loader)
                batch = next(batches)
            waited += time.perf_counter() - started
            yield batch

    source, warmup = timed_batches(), 20
    for i in range(warmup):                      # compilation and the frame cache fill happen here
        train_step(source, learning_rate(cfg, i), i)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    waited, started = 0.0, time.perf_counter()
    for i in range(warmup, warmup + steps):
        train_step(source, learning_rate(cfg, i), i)
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - started
    speed = Throughput(cfg.model, rt.device, rt.amp_dtype, cfg.batch_size).row(elapsed / steps)
    return {"compile": compile, "backend": cfg.backend, "steps": steps, "steps_per_s": speed["steps_per_s"],
            "data_wait_fraction": waited / elapsed, "peak_gpu_memory_gb": speed["gpu/max_memory_allocated_gb"],
            "mfu": speed.get("mfu")}


def extraction_rate(shards: Path, out: Path) -> dict:
    import train
    from model.extraction import ExtractConfig, extract

    ckpt = out / "checkpoint"
    shutil.rmtree(ckpt, ignore_errors=True)          # a run of its own each time (train.py refuses another's)
    code = train.main(["--shards", str(shards), "--preset", "full", "--iters", "20", "--out", str(ckpt),
                       "--run-dir", str(out / "run"), "--wandb", "disabled", "--no-compile"])
    assert code == 0, "training the extraction checkpoint failed"
    started = time.perf_counter()
    result = extract(ExtractConfig(shards, ckpt / "step-000020.pt", out / "latent", batch_size=256, overwrite=True,
                                   progress=False))
    pairs = sum(split["pairs"] for split in result.manifest["splits"].values())
    return {"pairs": pairs, "pairs_per_s": pairs / (time.perf_counter() - started)}


def report(results: dict) -> str:
    runs = results["full_preset"]
    rows = [[("compiled" if r["compile"] else "eager"), r["backend"], f"{r['steps_per_s']:.1f}",
             f"{r['data_wait_fraction']:.1%}", f"{r['peak_gpu_memory_gb']:.2f}",
             "n/a" if r["mfu"] is None else f"{r['mfu']:.1%}"] for r in runs]
    dali = results["dali_mixed_vs_cpu"]
    return "\n".join([
        "# GPU check", "", f"Machine: {results['machine']}", "",
        f"- CUDA tests: {results['cuda_tests']['summary']} (exit {results['cuda_tests']['exit_code']})",
        f"- DALI mixed vs CPU decoding: {dali.get('skipped') or ('identical' if dali['byte_for_byte'] else 'DIFFERENT')}"
        + ("" if "skipped" in dali else f" ({dali['identical']}/{dali['pairs']} pairs)"),
        f"- bf16 step: loss {results['mixed_precision']['bf16']['loss']:.4f}; fp16 + GradScaler step: loss "
        f"{results['mixed_precision']['fp16']['loss']:.4f}, scale {results['mixed_precision']['fp16']['scaler']}",
        f"- Extraction: {results['extraction']['pairs_per_s']:.0f} pairs/s ({results['extraction']['pairs']} pairs)", "",
        f"## `full` preset, batch 32, {runs[0]['steps']} steps after 20 warm-up steps", "",
        markdown_table(["mode", "loader", "steps/s", "data wait", "peak GPU GB", "MFU"], rows), ""])


def main(argv: list[str] | None = None) -> int:
    return run_cli(cli, argv)


def cli(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "reports" / "gpu-check")
    parser.add_argument("--steps", type=checked_type(int, "--steps", {"min": 1}), default=300)
    parser.add_argument("--preflight", action="store_true", help="only check for torch and a CUDA GPU")
    args = parser.parse_args(argv)
    problem = cuda_problem()
    if problem:
        print(f"gpu-check: needs torch with a CUDA GPU; {problem}; {HOW_TO_RUN}", file=sys.stderr)
        return 2
    if args.preflight:
        return 0
    check_output_dir(args.out, "--out")
    args.out.mkdir(parents=True, exist_ok=True)
    if not has_dali():
        print("gpu-check: DALI is not installed; the loader runs the torch backend", flush=True)
    shards = pair_shards(recorded_videos(episodes=40, max_steps=400))
    results = {"machine": machine(), "torch": torch.__version__, "cuda_tests": cuda_tests(),
               "dali_mixed_vs_cpu": dali_mixed_vs_cpu(shards), "mixed_precision": mixed_precision_steps(),
               "full_preset": [full_preset_speed(shards, args.steps, compile) for compile in (False, True)],
               "extraction": extraction_rate(shards, args.out)}
    (args.out / "gpu-check.json").write_text(json.dumps(results, indent=2))
    (args.out / "gpu-check.md").write_text(report(results))
    print(report(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
