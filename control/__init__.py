"""Downstream of the latent shards: the action -> code controller, rollouts of controller + LAM
decoder against recorded episodes, controllability, and the play page's server.

    from control import load_controller, Simulator
    controller = load_controller("checkpoints/controller/controller.pt")
    sim = Simulator(lam, controller)
    codes = sim.codes(cur, prev, action); nxt = sim.decode(cur, codes, prev)
"""
from control.checkpoint import CONTROLLER_FORMAT, load_controller, read_controller_checkpoint, save_controller
from control.network import ACTION_NAMES, Controller, ControllerConfig
from control.rollout import Simulator

__all__ = ["ACTION_NAMES", "CONTROLLER_FORMAT", "Controller", "ControllerConfig", "Simulator", "load_controller",
           "read_controller_checkpoint", "save_controller"]
