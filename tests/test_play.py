"""play.py and control/{rollout,server}.py: rollouts and their metrics, controllability scoring, the
play page's server (its files only, 4xx for bad requests, a burst of concurrent steps, idle
connections closed, POSTs from its own origin only, a clear page without a model) and a real
headless Chromium pressing keys on the page."""
from __future__ import annotations

import base64
import http.client
import io
import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from urllib.parse import unquote, urlsplit

import numpy as np
import pytest
import torch
from PIL import Image

import play
from control import Controller, ControllerConfig, Simulator, save_controller
from control.controllability import direction_score
from control.data import read_episodes
from control.rollout import run_rollouts
from control.server import STATIC_DIR, Game, StartFrame, make_server
from control.simulator import Choice
from model import load_checkpoint
from evaluation.events import PADDLE_BOTTOM, PADDLE_TOP, detect_elements

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")


@pytest.fixture(scope="module")
def controller_path(tmp_path_factory) -> Path:
    """An untrained small controller: rollouts and the server need its shapes, not its skill."""
    torch.manual_seed(0)
    controller = Controller(ControllerConfig(channels=(4, 8, 8, 8, 8), hidden=16, action_dim=8, prev_codes=True))
    return save_controller(tmp_path_factory.mktemp("controller") / "controller.pt", controller.eval(), step=0)


@pytest.fixture(scope="module")
def episodes(latent_dir):
    return read_episodes(latent_dir, "test", grayscale=True)


@pytest.fixture(scope="module")
def sim(tiny_checkpoint, controller_path):
    from control import load_controller

    return Simulator(load_checkpoint(tiny_checkpoint), load_controller(controller_path))


# ------------------------------------------------------------------------------------ rollouts
def test_rollout_yields_frames_fed_back_in(sim, episodes):
    frames = episodes[0].frames
    out = list(sim.rollout(frames[1:3], frames[0:2], torch.tensor([[2, 3, 0], [3, 3, 1]])))
    assert len(out) == 3 and all(f.shape == (2, 1, 210, 160) for f in out)
    assert all(0 <= float(f.min()) and float(f.max()) <= 1 for f in out)
    # step 2 decodes step 1's frame: the model's own output is its next input, and the controller
    # sees the codes it chose at step 1 as the step before's
    first = sim.codes(frames[1:3], frames[0:2], torch.tensor([2, 3]))
    choice = sim.codes(out[0], frames[1:3], torch.tensor([3, 3]), before=first)
    assert torch.allclose(sim.draw(out[0], choice, frames[1:3]), out[1])


def test_a_context_lam_decodes_with_the_previous_frame(context_checkpoint, controller_path, episodes):
    """Rolled out, a LAM with context gets frame t-1 each step: the recorded one at the start, then
    the frame it generated the step before."""
    from control import load_controller

    sim = Simulator(load_checkpoint(context_checkpoint), load_controller(controller_path))
    frames, actions = episodes[0].frames, torch.tensor([[2, 3, 0], [3, 3, 1]])
    out = list(sim.rollout(frames[1:3], frames[0:2], actions))
    before = None
    for step, (cur, prev) in enumerate([(frames[1:3], frames[0:2]), (out[0], frames[1:3]), (out[1], out[0])]):
        before = sim.codes(cur, prev, actions[:, step], before=before)
        torch.testing.assert_close(sim.draw(cur, before, prev), out[step], rtol=0, atol=1e-6)


def test_rollout_metrics_have_one_value_per_horizon_for_each_kind(sim, episodes):
    result = run_rollouts(sim, episodes, horizon=4, count=5, batch_size=3, gif_starts=1)
    curves = result.curves
    assert curves["horizon"] == [1, 2, 3, 4] and len(result.starts) == 5
    for kind in ("codes", "controller"):
        for name in ("psnr", "paddle_found", "paddle_within_2px", "ball_found", "ball_moving", "ball_phantom", "two_balls",
                     "bricks_lost_real", "bricks_lost_model", "bricks_off", "bricks_back", "grain"):
            assert len(curves[kind][name]) == 4, (kind, name)
        assert all(v is not None and 5 < v < 80 for v in curves[kind]["psnr"])
    assert all(v is not None and 5 < v < 80 for v in curves["copy"]["psnr"])
    panels = next(iter(result.gif_frames.values()))
    assert panels["real"].shape == panels["codes"].shape == panels["controller"].shape == (5, 1, 210, 160)
    assert torch.equal(panels["real"][0], panels["codes"][0])


def test_all_starts_at_once_score_what_one_at_a_time_does(sim, episodes):
    """Rollouts batch every start (play.py's default); the numbers are those of small batches
    within float rounding (the decoder's convolutions may round a bigger batch differently)."""
    together = run_rollouts(sim, episodes, horizon=3, count=4, batch_size=4, gif_starts=0).curves
    apart = run_rollouts(sim, episodes, horizon=3, count=4, batch_size=1, gif_starts=0).curves
    for kind in ("codes", "controller"):
        assert together[kind]["psnr"] == pytest.approx(apart[kind]["psnr"], abs=1e-3)
        for name in ("paddle_found", "ball_found", "bricks_lost_model"):
            assert together[kind][name] == pytest.approx(apart[kind][name], abs=0.26), (kind, name)


def test_recorded_codes_replay_the_recording_one_step_at_a_time(sim, episodes):
    """Kind "codes" feeds the decoder the codes extracted from the recording: its first step is the
    LAM's own reconstruction of the recorded transition."""
    e = episodes[0]
    first = next(sim.rollout(e.frames[1:3], e.frames[0:2], codes=e.codes[1:3, None]))
    torch.testing.assert_close(first, sim.lam.decode(e.frames[1:3], e.codes[1:3], e.frames[0:2]).clamp(0, 1))


def test_snapping_puts_every_pixel_on_the_palette(sim, episodes):
    from dataclasses import replace

    from pipeline.palette import frame_levels

    levels = frame_levels(torch.cat([e.frames for e in episodes]))
    snapped = replace(sim, palette=levels)
    frame = next(snapped.rollout(episodes[0].frames[1:2], episodes[0].frames[0:1], codes=episodes[0].codes[1:2, None]))
    assert set(torch.unique(frame).tolist()) <= set(levels.flatten().tolist())


def test_a_brick_that_comes_back_is_counted_and_two_balls_are_seen():
    from control.rollout import BricksGone

    start = torch.zeros(1, 210, 160)
    start[:, 57:93, 8:152] = 0.5                       # a full wall
    broken = start.clone()
    broken[:, 57:63, 8:16] = 0                          # one brick gone
    elements = [detect_elements(f) for f in (start, broken, start)]
    gone = BricksGone([elements[0]])
    assert gone.update([elements[1]]) == [False] and gone.update([elements[2]]) == [True]
    two = broken.clone()
    two[:, 120:124, 50:52] = 0.43
    two[:, 140:144, 90:92] = 0.43
    assert detect_elements(two).balls == 2 and detect_elements(broken).balls == 0


def test_kind_meter_scores_a_perfect_model_as_infinite_psnr():
    from control.rollout import KindMeter

    start, real = torch.zeros(2, 1, 210, 160), torch.zeros(2, 1, 210, 160)
    real[:, :, 100:104, 50:52] = 0.43                  # a ball
    meter = KindMeter(1)
    meter.frames[0].update(real.clone(), real, start)
    for frame, begin in zip(real, start):
        meter.counts[0].update(detect_elements(frame), detect_elements(frame), detect_elements(begin), False,
                               detect_elements(begin))
    curves = meter.curves()
    assert curves["psnr"] == [None] and curves["psnr_changed"] == [None]          # MSE 0: infinite, JSON null
    assert curves["two_balls"] == [0.0] and curves["bricks_back"] == [0.0] and curves["grain"] == [0.0]


def test_a_ball_found_but_frozen_in_place_is_not_counted_as_moving():
    """A model that draws the ball where it was every step is "found" wherever the recording shows a
    ball; the moving share tells it from the game's ball, which moves 4-8 px a step."""
    from control.rollout import StepCounts
    from evaluation.events import Elements

    bricks = np.ones((6, 18), dtype=bool)
    at = lambda ball: Elements(paddle_x=50, ball=ball, bricks=bricks)  # noqa: E731
    real = [at((100, 100 + 6 * h)) for h in range(4)]
    frozen, played = StepCounts(), StepCounts()
    for h in range(1, 4):
        frozen.update(at((100, 100 + h % 2)), real[h], real[0], False, at((100, 100 + (h - 1) % 2)))
        played.update(real[h], real[h], real[0], False, real[h - 1])
    assert frozen.compute()["ball_found"] == played.compute()["ball_found"] == 1.0
    assert frozen.compute()["ball_moving"] == 0.0 and played.compute()["ball_moving"] == 1.0
    # a ball that was not there the step before: found, but not yet scored for moving
    first = StepCounts()
    first.update(real[1], real[1], real[0], False, at(None))
    assert first.compute()["ball_found"] == 1.0 and first.compute()["ball_moving"] is None


def test_controllability_excludes_walls_and_fails_a_lost_paddle():
    rows = [{"start_x": 8, "end_x_left": 8, "end_x_right": 20},       # at the left wall: LEFT cannot move
            {"start_x": 50, "end_x_left": 40, "end_x_right": 60},
            {"start_x": 50, "end_x_left": None, "end_x_right": 50},   # paddle lost / did not move: failures
            {"start_x": 144, "end_x_left": 100, "end_x_right": 144},  # at the right wall: RIGHT cannot move
            {"start_x": None, "end_x_left": 1, "end_x_right": 1}]     # no paddle at the start: left out
    left, right = direction_score(rows, "left", "end_x_left"), direction_score(rows, "right", "end_x_right")
    assert (left["scored"], left["excluded_at_wall"], left["paddle_lost"]) == (3, 1, 1)
    assert left["success"] == pytest.approx(2 / 3)
    assert (right["scored"], right["excluded_at_wall"], right["success"]) == (3, 1, pytest.approx(2 / 3))


@pytest.mark.parametrize("channels", [1, 3])
def test_a_rollout_gif_shows_each_panels_pixels(tmp_path, channels):
    """Every GIF frame is the panels side by side, each pixel as the frame had it (rounded to 8 bits,
    scaled GIF_SCALE times): gray models' GIFs are written as gray frames, RGB ones as colour."""
    from control.figures import GAP_PX, GIF_SCALE, write_gif

    generator = torch.Generator().manual_seed(0)
    # few distinct values per frame, as game frames have: a GIF palette holds 256 colours
    panels = [torch.randint(0, 6, (3, channels, 20, 16), generator=generator) / 5 for _ in range(2)]
    gif = Image.open(write_gif(tmp_path / "rollout.gif", panels))
    assert gif.n_frames == 3 and gif.size == (GIF_SCALE * (2 * 16 + GAP_PX), GIF_SCALE * 20)
    for t in range(3):
        gif.seek(t)
        shown = np.asarray(gif.convert("RGB"))[::GIF_SCALE, ::GIF_SCALE]
        for index, panel in enumerate(panels):
            want = (panel[t] * 255).round().to(torch.uint8).permute(1, 2, 0).expand(20, 16, 3).numpy()
            left = index * (16 + GAP_PX)
            assert np.array_equal(shown[:, left:left + 16], want), (channels, t, index)


def test_rollout_cli_writes_report_gifs_and_figures(tiny_checkpoint, controller_path, latent_dir, tmp_path, capsys):
    out = tmp_path / "play"
    code = play.main(["rollout", "--checkpoint", str(tiny_checkpoint), "--controller", str(controller_path),
                      "--latent", str(latent_dir), "--out", str(out), "--horizon", "6", "--starts", "4",
                      "--gifs", "2", "--control-starts", "6", "--control-steps", "3", "--device", "cpu"])
    assert code == 0, capsys.readouterr().err
    metrics = json.loads((out / "metrics.json").read_text())
    curves = metrics["rollouts"]["curves"]
    assert len(curves["codes"]["psnr"]) == len(curves["controller"]["psnr"]) == 6
    assert metrics["controllability"]["starts"] == 6 and metrics["palette"] and metrics["device"] == "cpu"
    assert set(metrics["controllability"]["controller"]) == {"left", "right"}
    for name in metrics["gifs"]:
        gif = Image.open(out / name)
        assert gif.format == "GIF" and gif.n_frames == 7 and gif.size == (2 * (3 * 160 + 8), 2 * 210)
    report = (out / "report.md").read_text()
    assert "Controllability" in report and "## Goals" in report and "copy" in report and (out / "curves.png").is_file()
    assert play.main(["rollout", "--checkpoint", str(tiny_checkpoint), "--controller", str(controller_path),
                      "--latent", str(latent_dir), "--out", str(out), "--horizon", "5000"]) == 2
    assert capsys.readouterr().err.strip().startswith("error: ")


# ------------------------------------------------------------------------------------ server
def start_server(game, problem=None, **options):
    server = make_server("127.0.0.1", 0, game, problem, **options)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def request(server, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
    connection = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=30)
    connection.putrequest(method, path, skip_accept_encoding=True,     # the path goes out byte for byte
                          skip_host="Host" in (headers or {}))
    for name, value in {"Content-Length": str(len(body or b"")), **(headers or {})}.items():
        connection.putheader(name, value)
    connection.endheaders(body)
    response = connection.getresponse()
    data = response.read()
    connection.close()
    return response.status, data


def raw_request(server, data: bytes) -> bytes:
    import socket

    with socket.create_connection(("127.0.0.1", server.server_address[1]), timeout=30) as sock:
        sock.sendall(data)
        return sock.recv(4096)


def frame_of(answer: dict) -> np.ndarray:
    png = base64.b64decode(answer["frame"].split(",", 1)[1])
    return np.array(Image.open(io.BytesIO(png)))


@pytest.fixture(scope="module")
def game_server(sim, episodes):
    starts = [StartFrame(e.frames[t], e.frames[max(t - 1, 0)]) for e in episodes for t in range(len(e.frames))]
    server = start_server(Game(sim, starts, seed=0))
    yield server
    server.shutdown()
    server.server_close()


def test_page_and_steps(game_server):
    status, page = request(game_server, "GET", "/")
    assert status == 200 and b"/play.js" in page
    assert request(game_server, "GET", "/play.js")[0] == 200
    status, body = request(game_server, "POST", "/api/restart")
    assert status == 200 and json.loads(body)["step"] == 0
    status, body = request(game_server, "POST", "/api/step", json.dumps({"action": "RIGHT"}).encode())
    answer = json.loads(body)
    assert status == 200 and answer["step"] == 1 and answer["action"] == "RIGHT"
    assert frame_of(answer).shape == (210, 160) and set(answer["timing_ms"]) == {"controller", "decoder", "png"}


# The first three do reach real files when joined naively to the static folder (see the next test):
# a server that served STATIC_DIR / unquote(path) would answer them with play.py, pyproject.toml
# and /etc/passwd.
TRAVERSALS = ["/../../play.py", "/%2e%2e/%2e%2e/pyproject.toml", "/" + "../" * 24 + "etc/passwd",
              "/../pyproject.toml", "/%2e%2e/%2e%2e/etc/passwd", "/..%2fplay.py",
              "/static/../../play.py", "/play.js/../../play.py", "//etc/passwd", "/etc/passwd",
              "/%2Fetc%2Fpasswd", "/control/static/index.html", "/server.py", "/.%2e/play.py",
              "http://127.0.0.1/../../etc/passwd", "/..\\..\\play.py", "/play.js%00.html"]


def files_a_naive_server_would_serve(path: str) -> list[Path]:
    """What `path` names when joined to the static folder, decoded once or not at all."""
    found = []
    for url_path in {urlsplit(path).path, unquote(urlsplit(path).path)}:
        candidate = Path(os.path.normpath(STATIC_DIR / url_path.lstrip("/")))
        if "\0" not in str(candidate) and candidate.is_file():
            found.append(candidate)
    return found


def test_the_traversal_paths_reach_real_files():
    assert [files_a_naive_server_would_serve(path)[0].name for path in TRAVERSALS[:3]] == \
        ["play.py", "pyproject.toml", "passwd"]


@pytest.mark.parametrize("path", TRAVERSALS)
def test_no_file_outside_the_page(game_server, path):
    status, body = request(game_server, "GET", path)
    assert 400 <= status < 500
    for reached in files_a_naive_server_would_serve(path):
        if reached.parent != STATIC_DIR:
            assert reached.read_bytes() not in body, reached
    assert b"root:" not in body and b"import" not in body


def test_bad_requests_are_4xx_not_tracebacks(game_server):
    step = "/api/step"
    assert request(game_server, "POST", step, b"{not json")[0] == 400
    assert request(game_server, "POST", step, json.dumps({"action": "JUMP"}).encode())[0] == 400
    assert request(game_server, "POST", step, b"[1, 2]")[0] == 400
    assert request(game_server, "POST", step, b"x", {"Content-Length": "999999"})[0] == 413
    assert request(game_server, "POST", step, b"", {"Content-Length": "-5"})[0] == 400
    assert request(game_server, "POST", step, b"[" * 1000)[0] == 400           # RecursionError inside json
    assert request(game_server, "POST", step, b"x", {"Content-Length": "\u00b2"})[0] == 400   # '²'.isdigit()
    assert request(game_server, "POST", step, b"x", {"Content-Length": "1\u00b9"})[0] == 400   # '¹' too
    assert request(game_server, "GET", step)[0] == 405
    assert request(game_server, "PUT", "/")[0] == 405
    assert request(game_server, "DELETE", "/api/restart")[0] == 405
    assert request(game_server, "POST", "/nowhere")[0] == 404
    assert raw_request(game_server, b"BREW / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n").startswith(b"HTTP/1.1 405")
    assert b"400" in raw_request(game_server, b"NONSENSE\r\n\r\n")         # no status line: HTTP/0.9 style
    assert raw_request(game_server, b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\n\r\n").split(b" ")[1].startswith(b"4")
    assert request(game_server, "GET", "/")[0] == 200            # and it still serves


def paddle_game(episodes) -> Game:
    frames = [f for e in episodes for f in e.frames if (x := detect_elements(f).paddle_x) is not None and x < 100]
    assert frames, "no test frame with the paddle away from the right wall"
    return Game(PaddleScript(), [StartFrame(frames[0], frames[0])], seed=0)


def test_a_burst_of_concurrent_steps_is_served_in_full_and_in_order(episodes):
    server = start_server(paddle_game(episodes))
    answers, failures, start = [], [], threading.Barrier(200)

    def step():
        start.wait()
        try:
            status, body = request(server, "POST", "/api/step", b'{"action": "NOOP"}')
            answers.append((status, json.loads(body)["step"]))
        except Exception as error:                   # a reset connection, a timeout
            failures.append(repr(error))

    threads = [threading.Thread(target=step) for _ in range(200)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
    finally:
        server.shutdown()
        server.server_close()
    assert not failures, f"{len(failures)} of 200 failed, e.g. {failures[0]}"
    assert sorted(answers) == [(200, n) for n in range(1, 201)]        # one model step at a time


def test_an_idle_connection_is_closed_after_the_timeout(episodes):
    import socket

    server = start_server(paddle_game(episodes), idle_timeout=0.5)
    try:
        # recv waits for the server to close the socket; one it left open would time out (an error)
        with socket.create_connection(("127.0.0.1", server.server_address[1]), timeout=10) as silent:
            assert silent.recv(1024) == b""                            # closed by the server, no answer
        kept_alive = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=10)
        kept_alive.request("GET", "/api/state")
        assert kept_alive.getresponse().read()
        assert kept_alive.sock.recv(1024) == b""                       # closed once idle after one request
        kept_alive.close()
    finally:
        server.shutdown()
        server.server_close()


def test_posts_only_from_the_page_itself(game_server):
    port = game_server.server_address[1]
    step = "/api/step"
    body = json.dumps({"action": "NOOP"}).encode()
    steps = lambda: json.loads(request(game_server, "GET", "/api/state")[1])["step"]  # noqa: E731
    before = steps()
    for headers in ({"Origin": "https://evil.example"}, {"Origin": "null"},
                    {"Origin": f"http://127.0.0.1:{port + 1}"},             # another local page
                    {"Host": f"evil.example:{port}"},                        # DNS rebinding
                    {"Host": f"evil.example:{port}", "Origin": f"http://evil.example:{port}"}):
        status, answer = request(game_server, "POST", step, body, headers)
        assert status == 403 and "error" in json.loads(answer), headers
        assert request(game_server, "POST", "/api/restart", b"", headers)[0] == 403
    two_hosts = (b"POST /api/step HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nHost: evil.example:%d\r\n"
                 b"Content-Length: 2\r\n\r\n{}" % (port, port))
    # refused either way: by h11 (400: two Host headers are no request) or by the Host check (403)
    assert raw_request(game_server, two_hosts)[:12] in (b"HTTP/1.1 400", b"HTTP/1.1 403")
    assert steps() == before                                                # none of them played
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}"):
        status, _ = request(game_server, "POST", step, body, {"Host": host, "Origin": f"http://{host}"})
        assert status == 200, host
    assert request(game_server, "POST", step, body)[0] == 200                # no Origin: not a browser's cross-site POST
    assert steps() == before + 4


def test_the_names_the_server_answers_to():
    local, everywhere = make_server("127.0.0.1", 0, None), make_server("0.0.0.0", 0, None)
    try:
        port, other = local.server_address[1], everywhere.server_address[1]
        assert all(local.serves_host(f"{name}:{port}") for name in ("127.0.0.1", "localhost", "[::1]"))
        assert not any(local.serves_host(host) for host in (f"127.0.0.1:{port + 1}", "127.0.0.1", f"10.0.0.7:{port}",
                                                           f"evil.example:{port}", f"127.0.0.1:{port}@evil", ""))
        assert all(everywhere.serves_host(f"{name}:{other}") for name in ("localhost", "10.0.0.7", "[fe80::1]"))
        assert not everywhere.serves_host(f"evil.example:{other}")       # a domain rebound to this machine
    finally:
        local.server_close()
        everywhere.server_close()


def test_missing_checkpoint_gives_a_clear_page(tmp_path, controller_path, latent_dir):
    game, problem = play.build_game(play.ServeConfig(checkpoint=tmp_path / "none.pt", controller=controller_path,
                                                     latent=latent_dir))
    assert game is None and "none.pt" in problem and "not found" in problem
    server = start_server(None, problem)
    try:
        status, page = request(server, "GET", "/")
        assert status == 503 and b"cannot be played yet" in page and b"none.pt" in page
        status, body = request(server, "POST", "/api/step", b'{"action": "LEFT"}')
        assert status == 503 and "none.pt" in json.loads(body)["error"]
    finally:
        server.shutdown()
        server.server_close()


def test_serve_cli_says_what_is_missing_in_one_line(tmp_path, latent_dir, tiny_checkpoint):
    env = {**os.environ, "PORT": "0", "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen([sys.executable, str(ROOT / "play.py"), "serve", "--checkpoint", str(tiny_checkpoint),
                                "--controller", str(tmp_path / "no-controller.pt"), "--latent", str(latent_dir)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
    try:
        first = process.stdout.readline()
        assert first.startswith("play page on http://127.0.0.1:")
    finally:
        process.terminate()
        _, err = process.communicate(timeout=30)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("play: not ready:") and "no-controller.pt" in lines[0]


# ------------------------------------------------------------------------------------ browser
class PaddleScript:
    """A stand-in simulator whose physics is known: RIGHT moves the paddle 4 px right, LEFT 4 px
    left. The browser test checks the page and the server's wiring, not what a model learned."""

    def codes(self, cur, prev, action, random_codes=None, before=None):
        return Choice(action.view(-1, 1, 1).expand(-1, 7, 5).clone(), None)

    def draw(self, cur, choice, prev=None, older=None):
        shift = {2: 4, 3: -4}.get(int(choice.grid[0, 0, 0]), 0)
        x = detect_elements(cur[0]).paddle_x
        nxt = cur.clone()
        if x is not None:
            paddle = cur[..., PADDLE_TOP:PADDLE_BOTTOM, x:x + 16].clone()
            nxt[..., PADDLE_TOP:PADDLE_BOTTOM, 8:152] = 0
            new_x = min(max(x + shift, 8), 136)
            nxt[..., PADDLE_TOP:PADDLE_BOTTOM, new_x:new_x + 16] = paddle
        return nxt


def test_browser_arrow_keys_move_the_paddle(episodes):
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        pytest.skip("needs Debian's chromium and chromium-driver (apt-get install -y chromium chromium-driver)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="needs selenium (pip install selenium)")
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    server = start_server(paddle_game(episodes))
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=800,1000"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    try:
        driver.get(f"http://127.0.0.1:{server.server_address[1]}/")
        wait = WebDriverWait(driver, 30)
        wait.until(lambda d: (d.find_element("id", "frame").get_attribute("src") or "").startswith("data:image/png"))
        before_src = driver.find_element("id", "frame").get_attribute("src")
        before_shot = driver.get_screenshot_as_png()
        body = driver.find_element("tag name", "body")
        for pressed in range(1, 4):
            body.send_keys(Keys.ARROW_RIGHT)
            wait.until(lambda d: d.find_element("id", "step").text == str(pressed))
        assert driver.find_element("id", "action").text == "RIGHT"
        after_src = driver.find_element("id", "frame").get_attribute("src")
        assert after_src != before_src and driver.get_screenshot_as_png() != before_shot
        served_before = detect_elements(frame_of({"frame": before_src})).paddle_x
        served_after = detect_elements(frame_of({"frame": after_src})).paddle_x
        assert served_after == served_before + 12                 # three RIGHT steps of 4 px
        assert not driver.find_element("id", "error").is_displayed()
    finally:
        driver.quit()
        server.shutdown()
        server.server_close()


# ------------------------------------------------------------------------------------ what was made from what
def rollout_argv(checkpoint, controller, latent, out, *extra) -> list[str]:
    return ["rollout", "--checkpoint", str(checkpoint), "--controller", str(controller), "--latent", str(latent),
            "--out", str(out), "--horizon", "2", "--starts", "2", "--gifs", "0", "--control-starts", "2",
            "--control-steps", "2", "--batch-size", "2", *extra]


def test_latents_of_another_lam_are_refused_unless_allowed_and_then_the_report_says_so(
        tiny_checkpoint, controller_path, latent_dir, tmp_path, capsys):
    """`rollout --checkpoint A --latent <latents of B>` scored B's codes as "recorded codes" of A."""
    other = tiny_checkpoint.parent / "step-000010.pt"          # the latents are step 20's
    capsys.readouterr()
    assert play.main(rollout_argv(other, controller_path, latent_dir, tmp_path / "refused")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"error: {latent_dir}: made from another model")
    assert "step 20" in err and "step 10" in err and "--allow-other-checkpoint" in err
    assert not (tmp_path / "refused" / "metrics.json").exists()
    out = tmp_path / "allowed"
    assert play.main(rollout_argv(other, controller_path, latent_dir, out, "--allow-other-checkpoint")) == 0
    notes = json.loads((out / "metrics.json").read_text())["made_from_other"]
    assert len(notes) == 1 and str(latent_dir) in notes[0]
    assert "Made from another model" in (out / "report.md").read_text()


def test_a_controller_trained_for_another_lam_is_refused(tiny_checkpoint, latent_dir, tmp_path, capsys):
    """A controller trained on step 20's codes, played with step 10: refused (it was a warning, then
    a full report), by rollout and by the play server (whose page says why)."""
    from control import train as control_train

    assert control_train.main(["--latent", str(latent_dir), "--out", str(tmp_path / "controller"), "--steps", "2",
                               "--batch-size", "4", "--shuffle-buffer", "8", "--channels", "4", "8", "8", "8", "8",
                               "--hidden", "16", "--eval-batch-size", "16"]) == 0
    controller = tmp_path / "controller" / "controller.pt"
    other = tiny_checkpoint.parent / "step-000010.pt"
    capsys.readouterr()
    assert play.main(rollout_argv(other, controller, latent_dir, tmp_path / "play")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"error: {controller}: made from another model")
    game, problem = play.build_game(play.ServeConfig(checkpoint=other, controller=controller, latent=latent_dir))
    assert game is None and problem.startswith(f"{controller}: made from another model")
    assert play.main(rollout_argv(tiny_checkpoint, controller, latent_dir, tmp_path / "play")) == 0   # its own LAM


def test_codes_past_the_codebook_are_refused_by_rollout_and_the_play_server(tiny_checkpoint, controller_path,
                                                                           latent_dir, tmp_path, capsys):
    """Latents whose every code is +256 (stored uint16, the manifest saying uint16 as for a larger
    codebook) gave a rollout as good as the real codes: the FSQ lookup wrapped them. Now the
    rollout stops on the first such sample, and the play server's page says which."""
    from test_stream import first_test_shard, plus_256, rewrite_latent_shard

    latent = tmp_path / "latent"
    shutil.copytree(latent_dir, latent)
    shard = first_test_shard(latent)
    key = rewrite_latent_shard(latent, shard, plus_256)[0]
    manifest = json.loads((latent / "manifest.json").read_text())
    (latent / "manifest.json").write_text(json.dumps({**manifest, "code_dtype": "uint16"}))
    capsys.readouterr()
    assert play.main(rollout_argv(tiny_checkpoint, controller_path, latent, tmp_path / "play")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"error: {latent / shard}: sample {key}: codes.npy holds code")
    game, problem = play.build_game(play.ServeConfig(checkpoint=tiny_checkpoint, controller=controller_path,
                                                     latent=latent))
    assert game is None and problem.startswith(f"{latent / shard}: sample {key}: codes.npy holds code")
