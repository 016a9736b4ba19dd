"""GPU check: what this project cannot measure on its CPU boxes, in one run of a few minutes on one
H100/H200 with the machine's own torch (2.11+) and the wheels `make wheels` downloads.

    python -m bench.gpu_check [--out reports/gpu-check] [--steps 300] [--quality]
    python -m bench.gpu_check --device cpu --preset tiny --steps 2 --shards DIR    # a dry run of every stage

Stages, each in turn; each one's result is written to gpu-check.json and gpu-check.md the moment it
ends, and a stage that fails is recorded with its first error line while the others still run (a GPU
session is short: nothing measured is lost to a later failure):

1. cuda_tests: tests/test_cuda.py, every test by name with its outcome;
2. dali_mixed_vs_cpu: DALI "mixed" decoding against CPU decoding, byte for byte (needs DALI);
3. mixed_precision: one bf16 autocast step and one fp16 GradScaler step;
4. train_speed: the preset from real shards, eager and compiled (default, and reduce-overhead: CUDA
   graphs) at batch 32, eager and compiled at batch 256: steps/s, data wait, peak memory, MFU, and
   every step's loss (the compiled and eager runs see the same batches in the same order);
5. loss_curves: compiled against eager over those steps (mean of the last 50 losses);
6. extraction: seconds to the first latent shard written and steady pairs/s, and whether another
   batch size writes the same bytes;
7. evaluation: evaluate.py on the test split, in all and its pass over the split;
8. rollout: play.py rollout on the device: generated frames per second;
9. batch_quality (--quality): batch 32 against batch 256 (lr scaled, warm-up) at the same number of
   samples, scored on val.

With no torch, or a torch that sees no GPU, it says so in one line and exits 2 (`--preflight`: only
that check); `--device cpu` runs every stage that does not need CUDA, small, as a dry run.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

try:
    import torch
except Exception as error:          # noqa: BLE001 - no torch, or a broken one: main() says which, in one line
    torch, TORCH_IMPORT_ERROR = None, error

from common.cli import checked_type
from common.errors import check_output_dir, run_cli
from bench.common import ROOT, machine, markdown_table, pair_shards, recorded_videos

HOW_TO_RUN = "run it on the GPU machine with that machine's own Python: make gpu-check GPU_PY=/path/to/python3"
SPEED_RUNS = (("eager", 32, False, "default"), ("compiled", 32, True, "default"),
              ("compiled, reduce-overhead", 32, True, "reduce-overhead"),
              ("eager", 256, False, "default"), ("compiled", 256, True, "default"))
WARMUP_STEPS = 20


@dataclass
class CheckConfig:
    out: Path
    steps: int = 300
    device: str = "cuda"
    preset: str = "full"
    shards: Path | None = None          # None: record 40 episodes and pack them (made once, reused)
    quality: bool = False
    compile_backend: str = "inductor"   # the dry run may trace only (aot_eager): no code generation
    batches: tuple[int, ...] = (32, 256)            # the batch sizes train_speed times
    modes: tuple[str, ...] = ("eager", "compiled", "compiled, reduce-overhead")
    probe_limit: int = 1500             # evaluate.py's default: the evaluation stage times what a user's run does

    @property
    def on_gpu(self) -> bool:
        return self.device == "cuda"

    @property
    def warmup(self) -> int:
        return WARMUP_STEPS if self.on_gpu else 2


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


class Skipped(Exception):
    """A stage that cannot run here (recorded as skipped, with the reason)."""


def first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}".strip()


# ------------------------------------------------------------------------------------ the runner
def run_stages(stages: list[tuple[str, Callable[[], dict]]], out: Path, header: dict) -> dict:
    """Run `stages` in order; after each one, write every result so far (json and markdown). A stage
    that raises is recorded as {"error": its first line} and the next one runs."""
    results = dict(header)
    results["stages"] = {}
    for name, stage in stages:
        print(f"gpu-check: {name} ...", flush=True)
        started = time.perf_counter()
        try:
            result = stage()
        except Skipped as reason:
            result = {"skipped": str(reason)}
        except Exception as error:              # noqa: BLE001 - recorded; the other stages still run
            result = {"error": first_line(error)}
        result["seconds"] = round(time.perf_counter() - started, 1)
        results["stages"][name] = result
        write_results(results, out)
        print(f"gpu-check: {name}: " + (result.get("error") or result.get("skipped") or "done")
              + f" ({result['seconds']} s)", flush=True)
    return results


def write_results(results: dict, out: Path) -> None:
    for name, text in (("gpu-check.json", json.dumps(results, indent=2)), ("gpu-check.md", report(results))):
        temporary = out / f".{name}.tmp"
        temporary.write_text(text)
        os.replace(temporary, out / name)


# ------------------------------------------------------------------------------------ the stages
def cuda_tests(cfg: CheckConfig) -> dict:
    if not cfg.on_gpu:
        raise Skipped("needs CUDA")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider", "-m", "cuda",
                           str(ROOT / "tests" / "test_cuda.py")], capture_output=True, text=True, timeout=900,
                          cwd=cfg.out)
    outcomes = dict((test, outcome) for outcome, test in
                    re.findall(r"^(PASSED|FAILED|SKIPPED|ERROR) (?:\[\d+\] )?(\S+)", proc.stdout, re.MULTILINE))
    failures = re.findall(r"^E\s+(.*)$", proc.stdout, re.MULTILINE)
    return {"exit_code": proc.returncode, "summary": (proc.stdout.strip().splitlines() or [""])[-1],
            "tests": outcomes, "first_errors": failures[:5]}


def dali_mixed_vs_cpu(cfg: CheckConfig, shards: Path) -> dict:
    if not cfg.on_gpu:
        raise Skipped("needs CUDA")
    if not has_dali():
        raise Skipped("DALI is not installed here (its wheel is larger than one carry)")
    from pipeline.loader import build_loader

    make = lambda device: build_loader(shards, "val", 32, shuffle=False, drop_last=False, backend="dali",  # noqa: E731
                                       device=device, cache=False)
    pairs = equal = 0
    for gpu, cpu in zip(make("cuda"), make("cpu")):
        pairs += gpu["cur"].shape[0]
        same = (gpu["cur"].cpu() == cpu["cur"]).flatten(1).all(1) & (gpu["next"].cpu() == cpu["next"]).flatten(1).all(1)
        equal += int(same.sum())
    return {"pairs": pairs, "identical": equal, "byte_for_byte": pairs == equal}


def mixed_precision_steps(cfg: CheckConfig) -> dict:
    from model import LatentActionModel
    from training.config import build_config
    from training.runtime import Runtime
    from training.step import TrainStep

    device, result = torch.device(cfg.device), {}
    model_config = build_config(cfg.preset).model
    for name, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        model = LatentActionModel(model_config).to(device).train()
        step = TrainStep(model, torch.optim.Adam(model.parameters()), Runtime(0, 1, 0, device, dtype), grad_clip=1.0)
        cur = torch.rand(4 if not cfg.on_gpu else 32, model_config.in_channels, 210, 160, device=device)
        outcome = step(iter([{"cur": cur, "next": cur.roll(1, dims=3)}]), 3e-4, 0)
        result[name] = {"loss": outcome.terms["loss"], "skipped": outcome.skipped,
                        "scaler": step.scaler.get_scale() if step.scaler.is_enabled() else None}
    return result


def train_speed(cfg: CheckConfig, shards: Path, batch_size: int, compile: bool, mode: str) -> dict:
    """The trainer's own loader and TrainStep; data wait = time spent in next(batches)."""
    from model import LatentActionModel
    from pipeline.loader import build_loader, default_backend
    from training.config import build_config
    from training.runtime import setup_runtime
    from training.step import TrainStep, learning_rate
    from training.throughput import Throughput

    if not cfg.on_gpu and mode == "reduce-overhead":
        raise Skipped("CUDA graphs need CUDA")
    torch._dynamo.reset()
    flags = {"shards": str(shards), "compile": compile, "backend": default_backend(), "batch_size": batch_size,
             "compile_mode": mode, "compile_backend": cfg.compile_backend}
    run_cfg = build_config(cfg.preset, flags=flags)
    rt = setup_runtime(cfg.device, run_cfg.amp, run_cfg.seed, False, 0)
    layout = torch.channels_last if run_cfg.channels_last else torch.contiguous_format
    model = LatentActionModel(run_cfg.model).to(rt.device, memory_format=layout)
    optimizer = torch.optim.Adam(model.parameters(), lr=run_cfg.lr, fused=cfg.on_gpu)
    train_step = TrainStep(model, optimizer, rt, grad_clip=run_cfg.grad_clip, compile=compile, compile_mode=mode,
                           compile_backend=cfg.compile_backend)
    loader = build_loader(shards, "train", batch_size, backend=run_cfg.backend, device=rt.device,
                          seed=run_cfg.seed)
    if len(loader) == 0:
        raise Skipped(f"fewer than {batch_size} train pairs")
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

    source, losses = timed_batches(), []
    compile_started = time.perf_counter()
    for i in range(cfg.warmup):                  # compilation and the frame cache fill happen here
        losses.append(train_step(source, learning_rate(run_cfg, i), i).terms["loss"])
    warmup_seconds = time.perf_counter() - compile_started
    if cfg.on_gpu:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    steps = cfg.steps if batch_size <= 32 else max(1, cfg.steps // 3)
    waited, started = 0.0, time.perf_counter()
    for i in range(cfg.warmup, cfg.warmup + steps):
        losses.append(train_step(source, learning_rate(run_cfg, i), i).terms["loss"])
    if cfg.on_gpu:
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - started
    speed = Throughput(run_cfg.model, rt.device, rt.amp_dtype, batch_size).row(elapsed / steps)
    return {"batch_size": batch_size, "compile": compile, "mode": mode, "backend": run_cfg.backend, "steps": steps,
            "warmup_seconds": round(warmup_seconds, 1), "steps_per_s": speed["steps_per_s"],
            "samples_per_s": speed["steps_per_s"] * batch_size, "data_wait_fraction": waited / elapsed,
            "peak_gpu_memory_gb": speed.get("gpu/max_memory_allocated_gb"), "mfu": speed.get("mfu"),
            "losses": losses}


def loss_curves(speed: dict) -> dict:
    """Compiled against eager at batch 32: the same batches in the same order, so the same curve
    within float rounding (and the noise it grows into over the steps)."""
    eager, compiled = speed.get("eager, batch 32", {}), speed.get("compiled, batch 32", {})   # the default batches
    if "losses" not in eager or "losses" not in compiled:
        raise Skipped("needs both the eager and the compiled batch-32 runs")
    tail = lambda losses: sum(losses[-50:]) / len(losses[-50:])  # noqa: E731
    return {"steps": len(eager["losses"]), "eager_last_50": tail(eager["losses"]),
            "compiled_last_50": tail(compiled["losses"]),
            "relative_difference": abs(tail(compiled["losses"]) - tail(eager["losses"])) / tail(eager["losses"])}


def trained_checkpoint(cfg: CheckConfig, shards: Path) -> Path:
    """A checkpoint of the preset trained 20 steps (made once per check): what extraction, evaluation
    and rollouts time (their speed does not depend on how well it is trained)."""
    import train

    ckpt = cfg.out / "checkpoint"
    if not (ckpt / "step-000020.pt").exists():
        shutil.rmtree(ckpt, ignore_errors=True)
        code = train.main(["--shards", str(shards), "--preset", cfg.preset, "--iters", "20", "--out", str(ckpt),
                           "--run-dir", str(cfg.out / "run"), "--wandb", "disabled", "--no-compile",
                           "--set", "ckpt_every=20", "--set", f"device={cfg.device}"])
        if code != 0:
            raise RuntimeError("training the 20-step checkpoint failed")
    return ckpt / "step-000020.pt"


def extraction(cfg: CheckConfig, shards: Path, checkpoint: Path) -> dict:
    from model.extraction import ExtractConfig, extract

    big, small = (1024, 256) if cfg.on_gpu else (64, 24)
    out = cfg.out / "latent"
    shutil.rmtree(out, ignore_errors=True)
    first = first_file_time(out, "*.tar")
    started = time.perf_counter()
    result = extract(ExtractConfig(shards, checkpoint, out, batch_size=big, overwrite=True, progress=False,
                                   device=cfg.device))
    elapsed = time.perf_counter() - started
    startup = first() - started if first() else None
    pairs = sum(split["pairs"] for split in result.manifest["splits"].values())
    first_shard_pairs = result.manifest["splits"]["train"]["shards"][0]["pairs"]
    other = cfg.out / "latent-other-batch"
    shutil.rmtree(other, ignore_errors=True)
    again = extract(ExtractConfig(shards, checkpoint, other, batch_size=small, overwrite=True, progress=False,
                                  device=cfg.device))
    same = all([s["sha256"] for s in again.manifest["splits"][name]["shards"]]
               == [s["sha256"] for s in info["shards"]] for name, info in result.manifest["splits"].items())
    steady = (pairs - first_shard_pairs) / (elapsed - startup) if startup and elapsed > startup else None
    return {"pairs": pairs, "batch_size": big, "seconds": round(elapsed, 2),
            "seconds_to_first_shard": None if startup is None else round(startup, 2),
            "pairs_per_s_overall": pairs / elapsed, "pairs_per_s_steady": steady,
            f"same_bytes_at_batch_{small}": same}


def first_file_time(folder: Path, pattern: str) -> Callable[[], float | None]:
    """Watches `folder` in a thread; the returned function gives when a file matching `pattern`
    first appeared (perf_counter time), or None yet."""
    seen: list[float] = []

    def watch():
        deadline = time.perf_counter() + 3600
        while not seen and time.perf_counter() < deadline:
            if folder.is_dir() and any(folder.rglob(pattern)):
                seen.append(time.perf_counter())
            time.sleep(0.05)

    threading.Thread(target=watch, daemon=True).start()
    return lambda: seen[0] if seen else None


def evaluation(cfg: CheckConfig, shards: Path, checkpoint: Path) -> dict:
    from evaluation.run import EvaluateConfig, evaluate

    metrics, _ = evaluate(EvaluateConfig(shards=shards, checkpoint=checkpoint, split="test", out=cfg.out / "eval",
                                         latent=cfg.out / "latent", device=cfg.device, progress=False,
                                         probe_limit=cfg.probe_limit))
    return {"pairs": metrics["pairs"], "seconds": metrics["seconds"], "pass_seconds": metrics["pass_seconds"],
            "after_the_pass_seconds": round(metrics["seconds"] - metrics["pass_seconds"], 1),
            "timings": metrics.get("timings")}


def rollout(cfg: CheckConfig, checkpoint: Path) -> dict:
    """play.py rollout on the device with an untrained controller (speed does not need a skilled one)."""
    import play
    from control import Controller, ControllerConfig, save_controller
    from model import load_checkpoint

    lam = load_checkpoint(checkpoint, "cpu")
    controller = Controller(ControllerConfig(in_channels=lam.config.in_channels,
                                             codebook_size=lam.config.codebook_size))
    path = save_controller(cfg.out / "controller.pt", controller.eval(), step=0, lam={"sha256": lam.sha256})
    horizon, starts = (200, 48) if cfg.on_gpu else (4, 2)
    out = cfg.out / "play"
    shutil.rmtree(out, ignore_errors=True)
    started = time.perf_counter()
    code = play.main(["rollout", "--checkpoint", str(checkpoint), "--controller", str(path), "--latent",
                      str(cfg.out / "latent"), "--out", str(out), "--horizon", str(horizon), "--starts", str(starts),
                      "--gifs", "0", "--control-starts", str(starts), "--device", cfg.device])
    if code != 0:
        raise RuntimeError(f"play.py rollout exited {code}")
    seconds = time.perf_counter() - started
    played = json.loads((out / "metrics.json").read_text())["rollouts"]["starts"]
    return {"starts": played, "horizon": horizon, "seconds": round(seconds, 1),
            "frames_per_s": 2 * played * horizon / seconds}       # two kinds: recorded codes and controller


def batch_quality(cfg: CheckConfig, shards: Path) -> dict:
    """Batch 32 against batch 256 at the same number of samples, each scored on val by train.py's own
    validation (its last metrics row). Batch 256 takes lr × sqrt(8) with a linear warm-up."""
    import train

    if not cfg.quality:
        raise Skipped("--quality not given")
    steps32 = max(80, cfg.steps * 10)
    runs = {"batch 32": (32, steps32, []), "batch 256": (256, max(10, steps32 // 8),
                                                         ["--set", "lr=0.00085", "--set", "warmup=50"])}
    found = {}
    for name, (batch, steps, extra) in runs.items():
        folder = cfg.out / f"quality-{batch}"
        shutil.rmtree(folder, ignore_errors=True)
        code = train.main(["--shards", str(shards), "--preset", cfg.preset, "--batch-size", str(batch), "--iters",
                           str(steps), "--out", str(folder / "ckpt"), "--run-dir", str(folder / "run"), "--wandb",
                           "disabled", "--set", f"lr_decay_iters={steps}", "--set", f"metrics_every={steps}",
                           "--set", f"val_every={steps}", "--set", f"device={cfg.device}", *extra])
        if code != 0:
            raise RuntimeError(f"training {name} failed")
        rows = [json.loads(line) for line in (folder / "run" / "metrics.jsonl").read_text().splitlines()]
        last = next(row for row in reversed(rows) if any(key.startswith("val/") for key in row))
        found[name] = {"steps": steps, **{k: v for k, v in last.items() if k.startswith("val/")}}
    return found


# ------------------------------------------------------------------------------------ the report
def report(results: dict) -> str:
    stages = results.get("stages", {})
    lines = ["# GPU check", "", f"Machine: {results.get('machine')}; torch {results.get('torch')}; "
             f"commit {results.get('commit')}; preset {results.get('preset')}", ""]
    for name, result in stages.items():
        if "error" in result or "skipped" in result:
            lines.append(f"- {name}: " + (f"**failed**: {result['error']}" if "error" in result
                                          else f"skipped ({result['skipped']})"))
    tests = stages.get("cuda_tests", {})
    if "tests" in tests:
        lines += ["", f"CUDA tests: {tests['summary']}", ""]
        lines += [f"- {outcome}: {test}" for test, outcome in tests["tests"].items()]
    speed = stages.get("train_speed", {})
    rows = [[name, f"{r['steps_per_s']:.1f}", f"{r['samples_per_s']:.0f}", f"{r['data_wait_fraction']:.1%}",
             "n/a" if r.get("peak_gpu_memory_gb") is None else f"{r['peak_gpu_memory_gb']:.2f}",
             "n/a" if r.get("mfu") is None else f"{r['mfu']:.1%}", r["warmup_seconds"]]
            for name, r in speed.items() if isinstance(r, dict) and "steps_per_s" in r]
    failed = [f"- {name}: {r.get('error') or r.get('skipped')}" for name, r in speed.items()
              if isinstance(r, dict) and ("error" in r or "skipped" in r)]
    if rows or failed:
        lines += ["", f"## Training speed, preset {results.get('preset')}", "",
                  markdown_table(["run", "steps/s", "samples/s", "data wait", "peak GPU GB", "MFU",
                                  f"first {WARMUP_STEPS} steps, s"], rows), *failed]
    for name in ("loss_curves", "extraction", "evaluation", "rollout", "mixed_precision", "dali_mixed_vs_cpu",
                 "batch_quality"):
        result = stages.get(name)
        if result and "error" not in result and "skipped" not in result:
            lines += ["", f"## {name}", "", "```", json.dumps(result, indent=1)[:2000], "```"]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------ entry
def stages_for(cfg: CheckConfig) -> list[tuple[str, Callable[[], dict]]]:
    state: dict = {}

    def shards() -> Path:
        if "shards" not in state:
            state["shards"] = cfg.shards or pair_shards(recorded_videos(episodes=40, max_steps=400))
        return state["shards"]

    def checkpoint() -> Path:
        if "checkpoint" not in state:
            state["checkpoint"] = trained_checkpoint(cfg, shards())
        return state["checkpoint"]

    def speeds() -> dict:
        runs = {}
        for label, batch, compiled, mode in SPEED_RUNS:
            if label not in cfg.modes:
                continue
            batch = {32: cfg.batches[0], 256: cfg.batches[-1]}[batch]
            name = f"{label}, batch {batch}"
            if name in runs:
                continue
            try:
                runs[name] = train_speed(cfg, shards(), batch, compiled, mode)
            except Skipped as reason:
                runs[name] = {"skipped": str(reason)}
            except Exception as error:          # noqa: BLE001 - one configuration failing keeps the others
                runs[name] = {"error": first_line(error)}
        state["speed"] = runs
        return runs

    return [("cuda_tests", lambda: cuda_tests(cfg)),
            ("dali_mixed_vs_cpu", lambda: dali_mixed_vs_cpu(cfg, shards())),
            ("mixed_precision", lambda: mixed_precision_steps(cfg)),
            ("train_speed", speeds),
            ("loss_curves", lambda: loss_curves(state.get("speed", {}))),
            ("extraction", lambda: extraction(cfg, shards(), checkpoint())),
            ("evaluation", lambda: evaluation(cfg, shards(), checkpoint())),
            ("rollout", lambda: rollout(cfg, checkpoint())),
            ("batch_quality", lambda: batch_quality(cfg, shards()))]


def main(argv: list[str] | None = None) -> int:
    return run_cli(cli, argv)


def cli(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "reports" / "gpu-check")
    parser.add_argument("--steps", type=checked_type(int, "--steps", {"min": 1, "max": 100_000}), default=300)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                        help="cpu: a dry run of every stage that does not need CUDA")
    parser.add_argument("--preset", choices=("full", "demo", "tiny"), default="full")
    parser.add_argument("--shards", type=Path, default=None, help="pair shards (default: record 40 episodes)")
    parser.add_argument("--quality", action="store_true", help="also train batch 32 against batch 256")
    parser.add_argument("--compile-backend", choices=("inductor", "aot_eager"), default="inductor",
                        help="aot_eager: trace and partition only (a quick dry run on a CPU)")
    parser.add_argument("--batches", type=checked_type(int, "--batches", {"min": 1, "max": 4096}), nargs="+",
                        default=[32, 256], help="the small and the large batch train_speed times (default 32 256)")
    parser.add_argument("--modes", nargs="+", choices=[label for label, *_ in SPEED_RUNS][:3],
                        default=["eager", "compiled", "compiled, reduce-overhead"], help="what train_speed runs")
    parser.add_argument("--probe-limit", type=checked_type(int, "--probe-limit", {"min": 0}), default=1500,
                        help="train transitions for the evaluation stage's action probes (evaluate.py's default)")
    parser.add_argument("--preflight", action="store_true", help="only check for torch and a CUDA GPU")
    args = parser.parse_args(argv)
    problem = cuda_problem() if args.device == "cuda" else None
    if problem:
        print(f"gpu-check: needs torch with a CUDA GPU; {problem}; {HOW_TO_RUN}", file=sys.stderr)
        return 2
    if args.preflight:
        return 0
    check_output_dir(args.out, "--out")
    args.out.mkdir(parents=True, exist_ok=True)
    cfg = CheckConfig(args.out.resolve(), args.steps, args.device, args.preset, args.shards, args.quality,
                      args.compile_backend, tuple(args.batches), tuple(args.modes), args.probe_limit)
    if not has_dali():
        print("gpu-check: DALI is not installed; the loader runs the torch backend", flush=True)
    from training.runtime import git_sha

    header = {"machine": machine(), "torch": torch.__version__, "commit": git_sha(), "preset": cfg.preset,
              "device": cfg.device}
    results = run_stages(stages_for(cfg), cfg.out, header)
    print(report(results))
    failed = [name for name, result in results["stages"].items() if "error" in result]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
