"""Downstream of the latent shards: the action -> code controller, rollouts of controller + LAM
decoder against recorded episodes, controllability, and the play page's server.

    from control import load_controller, Simulator
    controller = load_controller("checkpoints/controller/controller.pt")
    sim = Simulator(lam, controller)
    choice = sim.codes(cur, prev, action); nxt = sim.draw(cur, choice, prev)

    network.py          Controller: frame t (and t-1) + action -> logits over the codebook per grid cell
    checkpoint.py       its checkpoint, in model/checkpoint.py's format ("lam-controller/1")
    data.py             batches and whole episodes from the latent shards (frame t-1, the recorded action)
    train.py            `python -m control.train`: the command and its training loop
    scores.py           the controller against each cell's most common code, on a split
    simulator.py        one step of play: controller codes -> LAM decoder; rollouts feed frames back in
    rollout.py          rollouts against recorded episodes, scored per step by evaluation's meters
    controllability.py  does always-LEFT / always-RIGHT move the paddle that way?
    figures.py          rollout GIFs, curves, controllability bars
    report.py           report.md of the controller, and of the rollouts and controllability
    server.py           the play page's HTTP server (play.py serve)

The grid, the codebook size and the action ids are pipeline's (frames.py, actions.py); numbers,
figures and the checkpoint format are evaluation's and model's.
"""
from control.checkpoint import CONTROLLER_FORMAT, load_controller, save_controller
from control.network import Controller, ControllerConfig
from control.simulator import Simulator

__all__ = ["CONTROLLER_FORMAT", "Controller", "ControllerConfig", "Simulator", "load_controller", "save_controller"]
