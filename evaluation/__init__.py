"""Measuring a trained model (evaluate.py, and the trainer's validation numbers).

    events.py         Breakout's paddle, ball, bricks and lives from pixels; gameplay events
    metrics.py        whole-split PSNR / SSIM / L1 / L2, changed-pixel PSNR, codebook use, element errors
    code_analysis.py  codes by gameplay event (NMI) and the action probes
    figures.py        codebook histogram, t-SNE, reconstruction grids, codes by event
    report.py         report.md per split and reports/summary.md
"""
