"""The play page with a trained model: holding → moves the paddle right, step after step, and the
paddle stays on the screen. Drives the real play server (HTTP, the page's own API) with the small
LAM and controller shipped in tests/assets (made from a `make demo` run by
tests/assets/make_play_models.py), from real Breakout frames the test session recorded."""
from __future__ import annotations

import base64
import http.client
import io
import json
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from control.checkpoint import load_controller
from control.data import read_episodes
from control.server import Game, StartFrame, make_server
from control.simulator import Simulator
from control.controllability import PADDLE_MAX_X, PADDLE_MIN_X
from evaluation.events import detect_elements
from model import load_checkpoint

ASSETS = Path(__file__).resolve().parent / "assets"
STEPS = 10
RESTARTS = 4


def post(server, path: str, payload: dict | None = None) -> dict:
    connection = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=60)
    body = json.dumps(payload or {}).encode()
    connection.request("POST", path, body, {"Content-Type": "application/json"})
    response = connection.getresponse()
    answer = json.loads(response.read())
    connection.close()
    assert response.status == 200, answer
    return answer


def paddle_x(answer: dict) -> int | None:
    png = base64.b64decode(answer["frame"].split(",", 1)[1])
    return detect_elements(np.array(Image.open(io.BytesIO(png)))).paddle_x


@pytest.fixture(scope="module")
def trained_server(latent_dir):
    sim = Simulator(load_checkpoint(ASSETS / "play_lam.pt"), load_controller(ASSETS / "play_controller.pt"))
    starts = [StartFrame(e.frames[t], e.frames[max(t - 1, 0)])
              for e in read_episodes(latent_dir, "test", grayscale=True) for t in range(len(e.frames))]
    # room to move both ways: a paddle against a wall cannot show the key working
    starts = [s for s in starts if (x := detect_elements(s.cur).paddle_x) is not None
              and PADDLE_MIN_X + 24 <= x <= PADDLE_MAX_X - 24]
    assert len(starts) >= RESTARTS
    server = make_server("127.0.0.1", 0, Game(sim, starts, seed=0))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("action, sign", [("RIGHT", 1), ("LEFT", -1)])
def test_holding_a_key_moves_the_paddle_that_way_and_keeps_it_visible(trained_server, action, sign):
    """From several start frames: 10 x the key through the page's API leaves the paddle on that side
    of where it started, and it is on screen after every step."""
    for _ in range(RESTARTS):
        start = paddle_x(post(trained_server, "/api/restart"))
        seen = [paddle_x(post(trained_server, "/api/step", {"action": action})) for _ in range(STEPS)]
        assert None not in seen, f"the paddle vanished while holding {action}: {seen}"
        assert sign * (seen[-1] - start) > 0, f"{STEPS} x {action} from x={start} ended at x={seen[-1]}: {seen}"
