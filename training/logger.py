"""The run's record: one metrics.jsonl row per step (step 1 first) and the same scalars to wandb
(offline unless the user says otherwise), plus codebook histograms and reconstruction images.
Rank 0 only."""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np

from evaluation.examples import Example
from pipeline.shards import atomic_write_bytes


class Logger:
    def __init__(self, run_dir: Path, run_name: str, wandb_mode: str, resume_step: int, enabled: bool, config: dict):
        """`wandb_mode` "" means $WANDB_MODE, else offline. On resume, rows a crashed run wrote after
        its last checkpoint are dropped, so the file reads as one run."""
        self.enabled, self.run_dir, self.wandb = enabled, run_dir, None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        self.path = run_dir / "metrics.jsonl"
        if resume_step and self.path.exists():
            rows = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            atomic_write_bytes(self.path, "".join(row + "\n" for row in rows).encode())
        elif not resume_step:
            self.path.write_text("")
        self.file = open(self.path, "a")
        mode = wandb_mode or os.environ.get("WANDB_MODE") or "offline"
        if mode != "disabled":
            import wandb

            os.environ.setdefault("WANDB_SILENT", "true")
            run_id = re.sub(r"[^A-Za-z0-9_-]", "-", run_name)      # wandb ids allow only these
            self.wandb = wandb.init(project="latent-actions", name=run_name, id=run_id, resume="allow",
                                    dir=str(run_dir), mode=mode, config=config)

    def log(self, step: int, row: dict, counts: np.ndarray | None = None,
            examples: list[Example] | None = None) -> None:
        """The step's scalars; `counts` (code use) becomes a histogram, `examples` a reconstruction PNG."""
        if not self.enabled:
            return
        row = dict(row)
        if counts is not None:
            row["codebook/counts"] = np.asarray(counts).tolist()
        image_path = None
        if examples:
            from evaluation.figures import reconstruction_grid     # matplotlib only when an image is due

            image_path = reconstruction_grid(examples, self.run_dir / "images" / f"step-{step:06d}.png")
            row["images/reconstruction"] = str(image_path.relative_to(self.run_dir))
        self.file.write(json.dumps({"step": step, **row}) + "\n")
        self.file.flush()
        if self.wandb is not None:
            import wandb

            payload = {k: v for k, v in row.items() if k not in ("codebook/counts", "images/reconstruction")}
            if counts is not None:
                edges = np.arange(len(counts) + 1)
                payload["codebook/histogram"] = wandb.Histogram(np_histogram=(np.asarray(counts), edges))
            if image_path is not None:
                payload["images/reconstruction"] = wandb.Image(str(image_path), caption="t | t+1 | pred | errors")
            self.wandb.log(payload, step=step)

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            if self.wandb is not None:
                self.wandb.finish()
