"""Training step speed and memory: eager fp32 vs torch.compile (and bf16 autocast), a batch-size
sweep, gradient checkpointing, FLOPs per step and MFU on a GPU.

Pure step speed on synthetic batches (uniform random frames; the loader is benchmarked on its own in
bench_loader): one optimiser step is training.step.TrainStep, the very step train.py runs. Every
configuration runs in its own child process so its peak memory is its own.

    python -m bench train
"""
from __future__ import annotations

import json

import torch

from bench.common import child_peak_rss_mb, markdown_table, run_child

DEMO_WIDTH = 0.25          # train.py's demo preset
PER_MACHINE = True                  # bf16 is native on some CPUs and emulated on others: both kinds kept
TITLE = "## Training step (train.py)"
INTRO = ("Synthetic batches (random 210×160 gray frames); one step = forward + backward + Adam; each row is its own "
         "child process. One block per kind of machine (bench/common.per_machine_section).")

CHILD = """
from bench.bench_train import time_steps
print(json.dumps(time_steps(json.loads({cfg!r}))))
"""


def time_steps(cfg: dict) -> dict:
    """In a child process: time the trainer's own TrainStep (forward + backward + clip + Adam) on one
    synthetic batch, after `warmup` steps (compilation happens there)."""
    import time

    from model import LatentActionModel, ModelConfig
    from training.runtime import Runtime
    from training.step import TrainStep

    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rt = Runtime(0, 1, 0, device, torch.bfloat16 if cfg["bf16"] else None)
    model = LatentActionModel(ModelConfig.named(cfg.get("variant", "default"), width=cfg["width"],
                                                **cfg.get("model", {}))).to(device).train()
    if cfg.get("channels_last"):
        model = model.to(memory_format=torch.channels_last)          # as train.py does (channels_last=True)
    model.set_grad_checkpoint(cfg["grad_checkpoint"])
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-4)
    train_step = TrainStep(model, optimizer, rt, grad_clip=1.0, compile=cfg["compile"])
    cur = torch.rand(cfg["batch"], 1, 210, 160, device=device)
    batch = {"cur": cur, "next": (cur + 0.05 * torch.rand_like(cur)).clamp(0, 1)}
    if model.config.context:
        batch["prev"] = (cur - 0.05 * torch.rand_like(cur)).clamp(0, 1)

    def steps(n: int) -> float:
        started = time.perf_counter()
        for i in range(n):
            outcome = train_step(iter([batch]), 3e-4, i)
            assert outcome.skipped is None, outcome.skipped
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - started

    warmup_s = steps(cfg["warmup"])
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    elapsed = steps(cfg["steps"])
    return {"steps_per_s": cfg["steps"] / elapsed, "warmup_s": warmup_s, "peak_rss_mb": child_peak_rss_mb(),
            "cuda_peak_mb": torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None}


def measure(width: float, batch: int, compile: bool = False, bf16: bool = False, grad_checkpoint: bool = False,
            steps: int = 10, warmup: int = 3, model: dict | None = None, channels_last: bool = False,
            variant: str = "default") -> dict:
    """One child's steps/s; `variant` (model/config.py VARIANTS) with `model`'s fields changed on top."""
    cfg = dict(width=width, batch=batch, compile=compile, bf16=bf16, grad_checkpoint=grad_checkpoint,
               steps=steps, warmup=warmup, variant=variant, model=model or {}, channels_last=channels_last)
    return run_child(CHILD.format(cfg=json.dumps(cfg)))


# (row, variant, fields changed on top, channels_last): the ablation's variants (model/config.py VARIANTS)
MODEL_OPTIONS = [
    ("three rounds ago: residual output, VQ", "vq-residual", {}, False),
    ("shift decoder, VQ", "vq-shift", {}, False),
    ("shift decoder, FSQ on every stage (fsq-shift: the default until the move prior)", "fsq-shift", {}, False),
    ("fsq-shift, channels_last (as train.py runs it)", "fsq-shift", {}, True),
    ("fsq-shift, codes FiLM the bottleneck only (latent_every_stage=false)", "fsq-shift",
     {"latent_every_stage": False}, False),
    ("the default: that + the move prior (motion_weight=3e-5)", "default", {}, False),
    ("fsq-shift, shifts chosen by source block (shift.indexed_by=source)", "fsq-shift",
     {"shift": {"indexed_by": "source"}}, False),
    ("the same + the encoder's view moved up to 8 px (encoder_jitter=8)", "fsq-shift",
     {"shift": {"indexed_by": "source"}, "encoder_jitter": 8}, False),
    ("fsq-shift + frame t-1 as context", "context", {}, False),
    ("fsq-shift + encoder matching features", "match", {}, False),
]


def option_rows() -> list[list]:
    results = [(name, measure(DEMO_WIDTH, 32, variant=variant, model=changes, channels_last=cl, steps=8))
               for name, variant, changes, cl in MODEL_OPTIONS]
    base = results[0][1]["steps_per_s"]
    return [[name, f"{1 / r['steps_per_s']:.2f}", f"{base / r['steps_per_s']:.2f}×"] for name, r in results]


def train_step_flops(width: float) -> float:
    from model import ModelConfig
    from training.throughput import training_flops_per_sample

    return training_flops_per_sample(ModelConfig(width=width))


def run() -> str:
    on_gpu = torch.cuda.is_available()
    device = torch.cuda.get_device_name(0) if on_gpu else "CPU"
    flops_demo, flops_full = train_step_flops(DEMO_WIDTH), train_step_flops(1.0)
    parts = [f"On the {device}. FLOPs per training step and sample (FlopCounterMode, forward + backward): demo preset "
             f"(width {DEMO_WIDTH}) {flops_demo / 1e9:.2f} GFLOP, full preset {flops_full / 1e9:.1f} GFLOP.\n"]

    # 1. eager vs compiled vs bf16, demo preset at its batch size
    modes = [("eager fp32", False, False), ("compiled fp32", True, False),
             ("eager bf16 autocast", False, True), ("compiled bf16 autocast", True, True)]
    results = {name: measure(DEMO_WIDTH, 32, compile=c, bf16=b) for name, c, b in modes}
    base = results["eager fp32"]["steps_per_s"]
    rows = [[name, f"{r['steps_per_s']:.2f}", f"{r['steps_per_s'] / base:.2f}×", f"{32 * r['steps_per_s']:.0f}",
             f"{r['warmup_s']:.0f}", f"{r['peak_rss_mb']:.0f}"] for name, r in results.items()]
    parts += [f"### Demo preset (width {DEMO_WIDTH}), batch 32: eager vs torch.compile vs bf16\n",
              markdown_table(["mode", "steps/s", "vs eager fp32", "samples/s", "warm-up s (3 steps, incl. compile)",
                              "peak RSS MB"], rows), ""]
    best_name = max(results, key=lambda name: results[name]["steps_per_s"])
    best = next(m for m in modes if m[0] == best_name)

    # 2. batch sweep in the fastest mode
    sweep = []
    for batch in (8, 16, 32, 64):
        r = measure(DEMO_WIDTH, batch, compile=best[1], bf16=best[2], steps=6 if batch >= 64 else 10)
        memory = f"{r['cuda_peak_mb']:.0f} (CUDA)" if r["cuda_peak_mb"] else f"{r['peak_rss_mb']:.0f} (RSS)"
        sweep.append([batch, f"{r['steps_per_s']:.2f}", f"{batch * r['steps_per_s']:.0f}", memory])
    parts += [f"### Batch-size sweep, demo preset, {best_name}\n",
              markdown_table(["batch", "steps/s", "samples/s", "peak memory MB"], sweep), ""]

    # 3. gradient checkpointing: memory for time, at full width where activations dominate
    ckpt_rows = []
    for width, batch in ((DEMO_WIDTH, 32), (1.0, 8)):
        plain = measure(width, batch, steps=4, warmup=2)
        checkpointed = measure(width, batch, grad_checkpoint=True, steps=4, warmup=2)
        key = "cuda_peak_mb" if on_gpu else "peak_rss_mb"
        ckpt_rows.append([f"width {width}, batch {batch}", f"{plain[key]:.0f}", f"{checkpointed[key]:.0f}",
                          f"{checkpointed[key] / plain[key]:.2f}×",
                          f"{checkpointed['steps_per_s'] / plain['steps_per_s']:.2f}×"])
    parts += ["### Gradient checkpointing (`--set grad_checkpoint=true`), eager fp32\n",
              markdown_table(["model", "peak MB off", "peak MB on", "memory ratio", "speed ratio"], ckpt_rows),
              "Peak memory is " + ("CUDA max_memory_allocated." if on_gpu else
                                   "the child's peak RSS (includes ~0.4 GB of torch itself, so the ratio understates "
                                   "the activation saving)."), ""]

    # 4. what each model option costs a step (the ablation's variants), beside two rounds ago's default
    parts += ["### Model options, demo preset, batch 32, eager fp32 (`make ablate`'s variants)\n",
              markdown_table(["model", "s / step", "vs two rounds ago"], option_rows()),
              "The default trains with `channels_last=True` (same outputs); the other rows use the default "
              "memory format, so they compare the options alone.", ""]

    if on_gpu:
        from training.throughput import peak_flops

        full = measure(1.0, 32, compile=True, bf16=True)
        achieved = full["steps_per_s"] * 32 * flops_full
        peak = peak_flops(torch.device("cuda"), torch.bfloat16)
        mfu = f"MFU {achieved / peak:.1%} of {device}'s bf16 peak" if peak else f"no peak known for {device}"
        parts.append(f"Full preset, batch 32, compiled bf16: {full['steps_per_s']:.2f} steps/s, "
                     f"{achieved / 1e12:.1f} TFLOP/s, {mfu}.\n")
    else:
        parts.append("MFU: not measured (no GPU on this machine).\n")
    return "\n".join(parts)


if __name__ == "__main__":
    print(run())
