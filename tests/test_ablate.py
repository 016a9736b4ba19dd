"""bench/ablate.py's tables, from runs' results: each rollout column says how many of the balls found
also moved, so an entry whose ball is drawn frozen does not read as one that plays."""
from __future__ import annotations

from bench import ablate

HORIZON = 200


def curves(ball_found: float, ball_moving: float | None) -> dict:
    kind = {"psnr": [30.0] * HORIZON, "paddle_found": [1.0] * HORIZON, "ball_found": [ball_found] * HORIZON,
            "ball_phantom": [0.0] * HORIZON, "two_balls": [0.0] * HORIZON, "bricks_lost_model": [1.0] * HORIZON,
            "bricks_lost_real": [1.0] * HORIZON}
    if ball_moving is not None:
        kind["ball_moving"] = [ball_moving] * HORIZON
    return kind


def run_result(ball_moving: float | None) -> dict:
    rollouts = {"horizon": list(range(1, HORIZON + 1)), "copy": {"psnr": [27.0] * HORIZON},
                "codes": curves(1.0, None if ball_moving is None else 1.0),
                "controller": curves(0.5, ball_moving)}
    control = {"controller": {"left": {"success": 0.9}, "right": {"success": 1.0}}}
    val = {"elements": {"paddle": {"model": {"within_2px": 0.97}}, "ball": {"model": {"within_2px": 0.85}}},
           "actions": {"move": {"codes_linear": 0.87}}, "codebook": {"used_fraction": 0.8},
           "model": {"psnr": 42.0}, "copy_baseline": {"psnr": 33.7}}
    return {"seconds_per_step": 0.3, "val": val, "play": {"controllability": control, "rollouts": {"curves": rollouts}}}


def test_the_ablation_row_shows_the_ball_found_and_how_much_of_it_moved():
    moving = [i for i, name in enumerate(ablate.HEADER) if name == "ball moving"]
    assert len(moving) == 2 and ablate.HEADER[moving[0] - 1] == ablate.HEADER[moving[1] - 1] == "ball found"
    cells = ablate.table_row("default", [run_result(0.0)])
    assert len(cells) == len(ablate.HEADER) and cells[0].startswith("`default`")
    assert cells[moving[0] - 1] == "100% / 100% / 100%" and cells[moving[0]] == "100% / 100% / 100%"  # recorded
    assert cells[moving[1] - 1] == "50% / 50% / 50%" and cells[moving[1]] == "0% / 0% / 0%"  # controller: frozen
    # results written before the rollouts measured the moving share still make a row
    older = ablate.table_row("default", [run_result(None)])
    assert older[moving[1]] == "n/a / n/a / n/a" and older[moving[1] - 1] == "50% / 50% / 50%"


def test_the_world_ablation_row_shows_the_ball_moving_too():
    name = next(iter(ablate.WORLD_ENTRIES))
    result = {"play": run_result(0.0)["play"], "sessions": [], "training": None}
    codes, controller = ablate.world_rows(name, result)
    assert len(codes) == len(controller) == len(ablate.WORLD_HEADER)
    column = ablate.WORLD_HEADER.index("ball moving")
    assert ablate.WORLD_HEADER[column - 1] == "ball found"
    assert codes[column] == "100% / 100% / 100% / 100%" and controller[column] == "0% / 0% / 0% / 0%"
    assert controller[column - 1] == "50% / 50% / 50% / 50%"


def test_every_entry_is_a_training_configuration_train_py_accepts():
    """Each row's variant and settings are what `make ablate` hands train.py (--model, --set): all
    of them must make a valid demo configuration, or the row fails hours into an ablation."""
    from operator import attrgetter

    from training.config import build_config

    for name, entry in ablate.ENTRIES.items():
        cfg = build_config("demo", entry.settings, model=entry.model)
        for setting in entry.settings:
            path, _, value = setting.partition("=")              # "shift.indexed_by": a part's field
            owner = cfg.model if hasattr(cfg.model, path.split(".")[0]) else cfg
            assert str(attrgetter(path)(owner)).lower() == value.lower(), (name, setting)
