"""The trainer's parts; train.py is the loop that joins them.

    cli.py           train.py's flags, --set and --resume -> the run's config (and the checkpoint it continues)
    config.py        TrainConfig (one dataclass, the model's ModelConfig inside), presets full/demo/tiny, --set parsing
    resume.py        --resume: the latest step file, the config from it, the same-data check, the state put back
    runtime.py       rank, device, DDP process group, threads, seeds, autocast dtype, collectives
    step.py          TrainStep: one optimiser update; the learning-rate schedule
    validate.py      Validator: validation loss, PSNR/SSIM, codebook use, examples, the move probe, on their cadences
    logger.py        metrics.jsonl + wandb (rank 0): scalars, codebook histograms, reconstruction images
    checkpointer.py  step-NNNNNN.pt and best.pt on their cadence
    throughput.py    samples/s, and on CUDA GPU memory and MFU, for every step's row
"""
