"""Every stage on one machine, fp32 and bf16 side by side; the bf16 agreement inference's precision
rule checks (model/precision.py); and the CPU levers, each against its baseline in the same run.

- Stages: record, pack, a training step, extraction, the evaluation pass, a controller training
  step, a rollout step and a play-server step, each run in fp32 and in bf16 (native or emulated, as
  this machine has it) in the same run; ratios bf16 / fp32. Record and pack run no model.
- Agreement: the demo model's codes and predicted frames in bf16 against fp32 on a fixed sample of
  the test split, beside the rule's bars.
- Levers (fp32, this CPU): channels_last, threads, torch.compile, batch size, the separable SSIM,
  the controller's decoded-frame cache; in one child process, the two sides of a row alternating.

The model: `make demo`'s (checkpoints/latent_action/best.pt on shards/pairs) where it exists, else
the demo architecture trained 20 steps (speed does not depend on training; agreement does).

    python -m bench stages
"""
from __future__ import annotations

import json
import os
import shutil
import statistics
import time
from pathlib import Path

import torch

from bench.common import BENCH_OUT, ROOT, markdown_table, pair_shards, recorded_videos, run_child

DEMO_CHECKPOINT = ROOT / "checkpoints" / "latent_action" / "best.pt"
DEMO_SHARDS = ROOT / "shards" / "pairs"
EPISODES, MAX_STEPS = 3, 120        # the stage data: one episode per split, about 120 pairs each
RECORD_STEPS = 100
PROBE_LIMIT = 200                   # train pairs for evaluate's probes (their fit is a fixed cost per run)
STEPS = 6                           # timed steps per cell (controller, rollout, server)
WORK = BENCH_OUT / "stages"
PER_MACHINE = True                  # bf16 is native on some CPUs and emulated on others: both kinds kept
TITLE = "## Stages: fp32 and bf16, and the CPU levers"
INTRO = ("One block per kind of machine (bench/common.per_machine_section): whether bf16 is native decides every "
         "ratio below, so a run on one kind keeps the other kinds' figures.")
DTYPES = {"fp32": None, "bf16": torch.bfloat16}


def timed(run) -> float:
    started = time.perf_counter()
    run()
    return time.perf_counter() - started


def model_and_data() -> tuple[Path, Path, Path, str]:
    """(checkpoint, shards to measure agreement on, the small stage shards, where the model is from)."""
    from bench.bench_extract import demo_checkpoint

    small = pair_shards(recorded_videos(episodes=EPISODES, max_steps=MAX_STEPS, seed=1))
    if DEMO_CHECKPOINT.is_file() and (DEMO_SHARDS / "manifest.json").is_file():
        return DEMO_CHECKPOINT, DEMO_SHARDS, small, f"`make demo`'s model ({DEMO_CHECKPOINT.relative_to(ROOT)})"
    return demo_checkpoint(small), small, small, "the demo architecture trained 20 steps (no `make demo` model here)"


# ------------------------------------------------------------------------------------ stages
def record_rate() -> float:
    from pipeline.record import record

    out = WORK / "record"
    shutil.rmtree(out, ignore_errors=True)
    seconds = timed(lambda: record(out, episodes=1, max_steps=RECORD_STEPS, seed=7, workers=1, progress=False))
    frames = sum(1 for _ in out.rglob("*.png"))
    return (frames - 1) / seconds


def pack_rate(videos: Path) -> float:
    from pipeline.pack import pack

    out = WORK / "pack"
    shutil.rmtree(out, ignore_errors=True)
    manifest = {}
    seconds = timed(lambda: manifest.update(pack(videos, out, workers=1, progress=False)))
    return sum(split["pairs"] for split in manifest["splits"].values()) / seconds


def train_rates() -> dict[str, float]:
    from bench.bench_train import DEMO_WIDTH, measure

    return {name: measure(DEMO_WIDTH, 32, bf16=dtype is not None, steps=3, warmup=1)["steps_per_s"]
            for name, dtype in DTYPES.items()}


def extract_rates(shards: Path, checkpoint: Path) -> tuple[dict[str, float], Path]:
    from model.extraction import ExtractConfig, extract

    rates = {}
    for name in DTYPES:
        out = WORK / f"latent-{name}"
        shutil.rmtree(out, ignore_errors=True)
        result = {}
        seconds = timed(lambda: result.update(manifest=extract(ExtractConfig(
            shards, checkpoint, out, amp="off" if name == "fp32" else name, progress=False)).manifest))
        rates[name] = sum(split["pairs"] for split in result["manifest"]["splits"].values()) / seconds
    return rates, WORK / "latent-fp32"


def evaluate_rates(shards: Path, checkpoint: Path, latent: Path) -> tuple[dict[str, float], dict]:
    from evaluation.run import EvaluateConfig, evaluate

    rates, runs = {}, {}
    for name in DTYPES:
        metrics, _ = evaluate(EvaluateConfig(shards, checkpoint, "test", WORK / f"report-{name}", latent=latent,
                                             probe_limit=PROBE_LIMIT, amp="off" if name == "fp32" else name,
                                             progress=False))
        rates[name], runs[name] = metrics["pairs"] / metrics["pass_seconds"], metrics
    return rates, runs


def controller_rates(latent: Path) -> tuple[dict[str, float], Path]:
    """A controller trained a few steps by control.train (the checkpoint the rollout cells play),
    then its training step (forward, backward, AdamW; batch 32 of real batches) in each dtype."""
    import torch.nn.functional as F

    from common.device import model_threads, torch_threads
    from control.data import FrameCache, targets, training_batches
    from control.train import ControllerTrainConfig, train

    out = WORK / "controller"
    config = ControllerTrainConfig(latent=latent, out=out, steps=4, log_every=100, eval_split="test")
    train(config, progress=lambda line: None)
    from control.checkpoint import load_controller

    controller = load_controller(out / "controller.pt").train().to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(controller.parameters(), lr=1e-4)
    stream = training_batches(latent, 32, grayscale=True, shuffle_buffer=64, seed=0, cache=FrameCache(True))
    batches = [next(stream) for _ in range(STEPS)]
    times = {name: [] for name in DTYPES}
    with torch_threads(model_threads(os.cpu_count() or 1)):
        for batch in batches:
            for name, dtype in DTYPES.items():
                def step():
                    with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
                        logits = controller.cell_logits(batch["cur"], batch["action"], batch["prev"])
                        loss = F.cross_entropy(logits.float(), targets(batch, "grid"))
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                times[name].append(timed(step))
    return {name: 1 / statistics.median(values) for name, values in times.items()}, out / "controller.pt"


def play_rates(checkpoint: Path, controller_path: Path, latent: Path) -> tuple[dict[str, float], dict[str, float]]:
    """Rollout steps/s (8 rollouts at once, as play.py rollout batches them) and the play server's
    ms per step (Game.step: controller, decoder, PNG), as play.py runs them (torch's default threads)."""
    from control.checkpoint import load_controller
    from control.data import read_episodes
    from control.server import Game, StartFrame
    from control.simulator import Simulator
    from model import load_checkpoint

    sim = Simulator(load_checkpoint(checkpoint, "cpu"), load_controller(controller_path, "cpu"))
    frames = read_episodes(latent, "test", grayscale=True)[0].frames
    start, prev = frames[1:9], frames[0:8]
    actions = torch.randint(0, 4, (8, STEPS), generator=torch.Generator().manual_seed(0))
    game = Game(sim, [StartFrame(frames[1], frames[0])], seed=0)
    rollout, server = {name: [] for name in DTYPES}, {name: [] for name in DTYPES}
    for _ in range(2):
        for name, dtype in DTYPES.items():
            with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
                rollout[name].append(STEPS / timed(lambda: list(sim.rollout(start, prev, actions))))
                game.restart()
                server[name] += [1000 * timed(lambda: game.step("LEFT")) for _ in range(STEPS)]
    return ({name: statistics.median(v) for name, v in rollout.items()},
            {name: statistics.median(v) for name, v in server.items()})


def agreement(checkpoint: Path, shards: Path):
    from model.inference import load_model
    from model.precision import agreement_batches, measure_agreement

    device = torch.device("cpu")
    lam, identity = load_model(checkpoint, device)
    manifest = json.loads((shards / "manifest.json").read_text())
    batches = agreement_batches(shards, manifest, grayscale=identity.color == "gray", context=identity.context,
                                device=device)
    return measure_agreement(lam, batches, device), identity


# ------------------------------------------------------------------------------------ levers
LEVERS_CHILD = """
from bench.bench_stages import levers
print(json.dumps(levers({checkpoint!r}, {shards!r}, {latent!r}, {controller!r})))
"""


def levers(checkpoint: str, shards: str, latent: str, controller_path: str) -> dict:
    """In a child process: each lever's two sides alternating, medians of ms per unit."""
    import copy

    from torchmetrics.functional.image.ssim import _ssim_update

    from control.data import FrameCache, training_batches
    from evaluation.metrics import ssim_per_frame
    from model import load_checkpoint
    from model.networks import fold_layouts_when_compiled
    from pipeline.loader import in_order_loader

    cpu = torch.device("cpu")
    plain = load_checkpoint(checkpoint, cpu)
    fast = copy.deepcopy(plain).to(memory_format=torch.channels_last)
    batch = next(iter(in_order_loader(shards, "test", 128, grayscale=True, device=cpu)))
    # the test split may hold fewer than 128 pairs: repeat it (the speed does not depend on the frames)
    cur, nxt = (batch[role].repeat(-(-128 // len(batch[role])), 1, 1, 1)[:128] for role in ("cur", "next"))
    results: dict[str, list] = {}

    def time_it(name: str, run, units: int, reps: int = 3):
        run()                                                     # warm-up: first calls allocate
        results.setdefault(name, []).extend(1000 * timed(run) / units for _ in range(reps))

    def model_pass(lam, size=64):
        codes = lam.encode(cur[:size], nxt[:size])
        lam.decode(cur[:size], codes)

    cores = os.cpu_count() or 1
    with torch.inference_mode():
        for _ in range(2):
            torch.set_num_threads(1)
            time_it("nchw", lambda: model_pass(plain), 64)
            time_it("channels_last", lambda: model_pass(fast), 64)
            for size in (32, 64, 128):
                time_it(f"batch {size}", lambda size=size: model_pass(fast, size), size)
            torch.set_num_threads(cores)
            time_it("all cores", lambda: model_pass(fast), 64)
            torch.set_num_threads(1)
            time_it("one thread", lambda: model_pass(fast), 64)
            pred = (nxt[:32] + 0.02 * torch.randn_like(nxt[:32])).clamp(0, 1)
            time_it("ssim torchmetrics", lambda: _ssim_update(pred, nxt[:32], data_range=1.0), 32)
            time_it("ssim separable", lambda: ssim_per_frame(pred, nxt[:32]), 32)
        fold_layouts_when_compiled()
        compiled_encode = torch.compile(fast.encode_both, dynamic=True)
        compiled_decoder = torch.compile(fast.decoder, dynamic=True)

        def compiled_pass():
            codes = compiled_encode(cur[:64], nxt[:64])[0]
            compiled_decoder(cur[:64], fast.quantizer.lookup(codes))

        compile_seconds = timed(compiled_pass)
        same_codes = bool(torch.equal(compiled_encode(cur, nxt)[0], plain.encode(cur, nxt)))
        for _ in range(2):
            time_it("eager", lambda: model_pass(fast), 64)
            time_it("compiled", compiled_pass, 64)

    # the play server's step (controller, decoder, PNG) as play.py runs it, and channels_last on one thread
    from control.checkpoint import load_controller
    from control.data import read_episodes
    from control.server import Game, StartFrame
    from control.simulator import Simulator

    frames = read_episodes(latent, "test", grayscale=True)[0].frames
    games = {}
    for name in ("server as play.py runs it", "server channels_last, one thread"):
        sim = Simulator(load_checkpoint(checkpoint, cpu), load_controller(controller_path, "cpu"))
        if "channels_last" in name:
            sim.lam.to(memory_format=torch.channels_last)
            sim.controller.to(memory_format=torch.channels_last)
        games[name] = Game(sim, [StartFrame(frames[1], frames[0])], seed=0)
    for _ in range(2):
        for name, game in games.items():
            torch.set_num_threads(1 if "one thread" in name else cores)
            game.restart()
            time_it(name, lambda game=game: game.step("LEFT"), 1, reps=4)

    # the controller's batches: decoding every frame of every sample, or each distinct frame once
    cache = FrameCache(grayscale=True)
    warm = training_batches(latent, 32, grayscale=True, shuffle_buffer=64, seed=0, cache=cache)
    for _ in range(40):                                           # more than an epoch: the cache is full
        next(warm)
    stream = training_batches(latent, 32, grayscale=True, shuffle_buffer=64, seed=0)
    next(stream)
    for _ in range(2):
        time_it("stream", lambda: next(stream), 1, reps=5)
        time_it("cached", lambda: next(warm), 1, reps=5)
    medians = {name: statistics.median(values) for name, values in results.items()}
    return {"ms": medians, "compile_seconds": compile_seconds, "compiled_same_codes": same_codes, "cores": cores}


def lever_rows(result: dict) -> list[list]:
    ms = result["ms"]

    def row(lever: str, unit: str, baseline: str, candidate: str, verdict: str) -> list:
        return [lever, unit, f"{baseline}: {ms[baseline]:.2f}", f"{candidate}: {ms[candidate]:.2f}",
                f"{ms[baseline] / ms[candidate]:.2f}x", verdict]

    return [
        row("memory layout of the LAM (encode + decode, batch 64, 1 thread)", "ms / pair", "nchw", "channels_last",
            "kept: extraction, evaluation (model/inference.inference_layout), the controller's training"),
        row(f"threads for the model: all {result['cores']} cores or one (channels_last)", "ms / pair", "all cores",
            "one thread", "kept as cores less the neighbouring stages (common/device.model_threads); "
                          "stages run side by side; not the controller's training (section play)"),
        row("evaluation batch size 64 (the default) or 32", "ms / pair", "batch 64", "batch 32", "64 kept"),
        row("evaluation batch size 64 or 128", "ms / pair", "batch 64", "batch 128", "64 kept"),
        row("torch.compile of encoder and decoder (inductor, dynamic batch size, after compiling)", "ms / pair",
            "eager", "compiled",
            f"dropped: compiling took {result['compile_seconds']:.0f} s in this run (inductor's cache was "
            f"{'warm' if result['compile_seconds'] < 30 else 'cold'}), more than a demo split's whole pass; "
            f"codes equal to eager's: {result['compiled_same_codes']}"),
        row("SSIM: torchmetrics' 11 x 11 window or the separable one", "ms / frame", "ssim torchmetrics",
            "ssim separable", "kept (evaluation/metrics.ssim_per_frame)"),
        row("controller batches: decode every frame of every sample, or each distinct frame once", "ms / batch",
            "stream", "cached", "kept (control/data.FrameCache)"),
        row("play-server step (`Game.step`)", "ms / step", "server as play.py runs it",
            "server channels_last, one thread", "asked of play.py's owners (not ours to change)"),
    ]


# ------------------------------------------------------------------------------------ report
def run() -> str:
    from common.device import cpu_native_bf16
    from model.precision import CODE_AGREEMENT, PSNR_GAP_DB

    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True)
    load_before = os.getloadavg()[0]
    checkpoint, agreement_shards, small, origin = model_and_data()
    videos = recorded_videos(episodes=EPISODES, max_steps=MAX_STEPS, seed=1)
    native = cpu_native_bf16()
    bf16_kind = f"native ({native})" if native else "emulated (no avx512_bf16 or AMX)"

    stages = [("record (`make data`)", "frames/s", {"fp32": record_rate()}),
              ("pack (`make shards`)", "pairs/s", {"fp32": pack_rate(videos)}),
              ("train step (demo preset, batch 32, eager)", "steps/s", train_rates())]
    extract, latent = extract_rates(small, checkpoint)
    stages.append(("extract (every split)", "pairs/s", extract))
    evaluate, runs = evaluate_rates(small, checkpoint, latent)
    stages.append(("evaluate: the pass over the test split", "pairs/s", evaluate))
    controller, controller_path = controller_rates(latent)
    stages.append(("controller training step (batch 32)", "steps/s", controller))
    rollout, server = play_rates(checkpoint, controller_path, latent)
    stages += [("rollout step (8 rollouts at once)", "steps/s", rollout),
               ("play-server step (`Game.step`, no HTTP)", "ms/step", server)]
    rows = []
    for stage, unit, values in stages:
        if "bf16" not in values:
            rows.append([stage, unit, f"{values['fp32']:,.1f}", "(no model)", ""])
            continue
        ratio = values["bf16"] / values["fp32"]
        rows.append([stage, unit, f"{values['fp32']:,.2f}", f"{values['bf16']:,.2f}",
                     f"{1 / ratio if unit == 'ms/step' else ratio:.2f}x"])

    measured, identity = agreement(checkpoint, agreement_shards)
    lever_result = run_child(LEVERS_CHILD.format(checkpoint=str(checkpoint), shards=str(small), latent=str(latent),
                                                 controller=str(controller_path)))
    load_after = os.getloadavg()[0]
    fp32_run, bf16_run = runs["fp32"], runs["bf16"]
    verdict = "passes" if measured.passes else "fails"
    return "\n".join([
        f"bf16 on this machine: **{bf16_kind}**. The model: {origin}, step {identity.step}. Stage data: "
        f"{EPISODES} recorded episodes of up to {MAX_STEPS} steps (one per split). Each stage runs in fp32 and "
        "in bf16 autocast in the same run; speed ratio bf16 over fp32 (above 1: bf16 faster).", "",
        markdown_table(["stage", "unit", "fp32", "bf16", "bf16 speed vs fp32"], rows), "",
        f"- Evaluate's whole run (the pass, probes on {PROBE_LIMIT} train pairs, figures): "
        f"{fp32_run['seconds']:.0f} s fp32, {bf16_run['seconds']:.0f} s bf16, of which the pass "
        f"{fp32_run['pass_seconds']:.0f} s and {bf16_run['pass_seconds']:.0f} s; the probes' fits and the figures "
        "are a fixed cost per run, not per pair.",
        "- Rollouts and the play server run as `play.py` runs them (torch's default threads, the model as loaded).",
        "", "#### bf16 against fp32: the precision rule's check", "",
        f"On {measured.pairs} pairs of a fixed sample of the test split ({agreement_shards.relative_to(ROOT) if agreement_shards.is_relative_to(ROOT) else agreement_shards}):", "",
        markdown_table(["", "measured", "bar (model/precision.py)"], [
            ["code cells equal to fp32's", f"{measured.code_cells:.2%}", f">= {CODE_AGREEMENT:.1%}"],
            ["PSNR against the true t+1, fp32 / bf16", f"{measured.psnr_fp32:.3f} / {measured.psnr_low:.3f} dB", ""],
            ["PSNR gap", f"{measured.gap_db:.4f} dB", f"< {PSNR_GAP_DB} dB"],
            ["bf16 prediction against the fp32 one", f"{measured.psnr_between:.1f} dB PSNR", ""]]), "",
        f"The model {verdict} both bars, so `--amp auto` would run it in "
        f"{'bf16' if measured.passes else 'fp32'} where bf16 is native; here bf16 is {bf16_kind.split(' ')[0]}, "
        f"{'so auto runs it in fp32 without measuring' if not native else 'so auto measures this at the start of each run'}. "
        "The check is per checkpoint (a code flips where an FSQ projection sits near a rounding boundary), so "
        "extraction and evaluation repeat it on a 256-pair sample wherever bf16 is native.",
        "", "#### CPU levers, fp32", "",
        "Each row's two sides alternate in one child process; medians. Same outputs within float rounding "
        "(tested: the same codes, the same metrics).", "",
        markdown_table(["lever", "unit", "baseline", "candidate", "speed-up", "decision"], lever_rows(lever_result)),
        "",
        f"- The box is shared: load average {load_before:.1f} before and {load_after:.1f} after, on "
        f"{lever_result['cores']} cores. The thread row depends most on that: an OpenMP team of all cores waits "
        "for members another process holds; on a quiet machine it moves towards the cores' count.",
    ])


if __name__ == "__main__":
    print(run())
