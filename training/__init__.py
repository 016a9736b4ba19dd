"""The trainer's parts; train.py is the loop that joins them.

    config.py        TrainConfig (one dataclass), presets full/demo/tiny, --set parsing
    runtime.py       rank, device, DDP process group, threads, seeds, autocast dtype, collectives
    step.py          TrainStep: one optimiser update; the learning-rate schedule
    validate.py      Validator: validation loss, PSNR/SSIM, codebook use, examples, on their cadences
    logger.py        metrics.jsonl + wandb (rank 0)
    checkpointer.py  step-NNNNNN.pt and best.pt on their cadence, --resume
"""
