"""Breakout's minimal action set: the ids the recorder writes into meta.jsonl (`action`), and the
names the controller, the play page and the reports use for them."""
from __future__ import annotations

ACTION_NAMES = ("NOOP", "FIRE", "RIGHT", "LEFT")
NOOP, FIRE, RIGHT, LEFT = range(len(ACTION_NAMES))
