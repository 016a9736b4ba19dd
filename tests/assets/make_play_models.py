"""Write the small trained LAM and controller the play-page test drives (tests/test_play_model.py):
copies of a `make demo` run's best.pt and controller.pt with their weights in float16 and no
optimiser or resume state, so both fit in the repository (about 4 MB together).

    python tests/assets/make_play_models.py [--checkpoint checkpoints/latent_action/best.pt]
        [--controller checkpoints/controller/controller.pt] [--out tests/assets]

The weights load back into float32 modules (load_state_dict casts), so the test runs the model as
trained, give or take float16 rounding of the weights.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from control.checkpoint import load_controller, save_controller  # noqa: E402
from model import load_checkpoint, save_checkpoint  # noqa: E402

LAM_NAME, CONTROLLER_NAME = "play_lam.pt", "play_controller.pt"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, default=ROOT / "checkpoints/latent_action/best.pt")
    parser.add_argument("--controller", type=Path, default=ROOT / "checkpoints/controller/controller.pt")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    args = parser.parse_args()
    lam = load_checkpoint(args.checkpoint)
    save_checkpoint(args.out / LAM_NAME, lam.half(), {"model": lam.config.to_dict()}, lam.step,
                    source={"sha256": lam.sha256, "step": lam.step})
    controller = load_controller(args.controller)
    save_controller(args.out / CONTROLLER_NAME, controller.half(), step=controller.step, lam=controller.lam)
    for name in (LAM_NAME, CONTROLLER_NAME):
        print(f"{args.out / name}: {(args.out / name).stat().st_size / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
