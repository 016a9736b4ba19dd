"""Measuring a trained model (evaluate.py, the trainer's validation numbers, and control/'s rollouts).

    events.py         Breakout's paddle, ball, bricks and lives from pixels; gameplay events
    metrics.py        whole-split PSNR / SSIM / L1 / L2, changed-pixel PSNR, codebook use, element errors
    code_analysis.py  codes by gameplay event (NMI); one-hot codes and the visible-effect rule the probes share
    probes.py         do the codes carry the action? linear and MLP probes beside frame t and the pixel difference
    examples.py       the pairs a reconstruction grid shows, as images (no matplotlib)
    figures.py        codebook histogram, t-SNE, reconstruction grids, codes by event; save_figure for every figure
    formatting.py     how reports and command lines write numbers (n/a for a missing value)
    report.py         report.md per split and reports/summary.md
    split_pass.py     one batched pass over a split (or a torchrun rank's share), its shares gathered
    probe_data.py     the probes' train and evaluated pairs, codes from latent shards or encoded now
    run.py            EvaluateConfig and evaluate(): what evaluate.py runs
"""
