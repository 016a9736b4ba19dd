"""The play page's server: standard library only (ThreadingHTTPServer), one game shared by the page.

Routes: GET / (the page), /play.js, /style.css (its files: a fixed allow-list read once at start,
so no URL, whatever its `..` or percent-encoding, can reach any other file); GET /api/state (the
current frame); POST /api/step {"action": "LEFT"|"RIGHT"|"FIRE"|"NOOP"}; POST /api/restart (a
random test frame). Every API answer is JSON: {"step", "action", "frame" (a PNG data URL),
"timing_ms": {"controller", "decoder", "png"}}. A request the server cannot serve gets a 4xx and a
one-line reason; an unexpected failure a 500 and one log line, never a traceback on the page.

Under load: a listen backlog sized for a burst of concurrent steps, a thread per connection that an
idle client gives back after IDLE_TIMEOUT_S, and one model step at a time (Game's lock): every tab
the user opens plays the same game, their steps interleaved in arrival order. POSTs are taken only
from the page's own origin (Origin, when sent, must match the Host header, which must name this
server: a loopback name or the host it was started with, at its port; bound to every interface,
also an IP address or the machine's name), so no other web page the user has open can drive it.

Without a usable LAM checkpoint, controller or test frames the server still starts, and the page
(and every API call, with 503) says what is missing and how to make it.
"""
from __future__ import annotations

import base64
import html
import io
import ipaddress
import json
import random
import re
import socket
import sys
import threading
import time
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import torch
from PIL import Image

from pipeline.actions import ACTION_NAMES

from control.figures import to_uint8_image
from control.simulator import Simulator

STATIC_DIR = Path(__file__).resolve().parent / "static"
STATIC_ROUTES = {"/": "index.html", "/index.html": "index.html", "/play.js": "play.js", "/style.css": "style.css"}
CONTENT_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                 ".css": "text/css; charset=utf-8"}
MAX_BODY_BYTES = 1024
CONTENT_LENGTH = re.compile(r"[0-9]{1,9}")          # ASCII digits only: str.isdigit() also takes '²'
LISTEN_BACKLOG = 256                                 # socketserver's default of 5 resets a burst of steps
IDLE_TIMEOUT_S = 30.0                                # a kept-alive connection that sends nothing is closed
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]")
WILDCARD_HOSTS = ("", "0.0.0.0", "::")


def load_static_files() -> dict[str, tuple[bytes, str]]:
    """route -> (bytes, content type), read once: requests never touch the file system."""
    return {route: ((STATIC_DIR / name).read_bytes(), CONTENT_TYPES[Path(name).suffix])
            for route, name in STATIC_ROUTES.items()}


def encode_png(frame: torch.Tensor) -> bytes:
    """(C, H, W) in [0, 1] -> PNG bytes; compress_level 1: Breakout frames compress well anyway and
    the higher levels cost milliseconds per frame."""
    array = to_uint8_image(frame)
    image = Image.fromarray(array[..., 0] if frame.shape[0] == 1 else array)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


@dataclass
class StartFrame:
    cur: torch.Tensor        # (C, H, W)
    prev: torch.Tensor


class Game:
    """The model's game state (frame t, frame t-1, step) and one step of play, thread-safe."""

    def __init__(self, sim: Simulator, starts: list[StartFrame], seed: int | None = None):
        if not starts:
            raise ValueError("no start frames")
        self.sim, self.starts = sim, starts
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.restart()

    def restart(self) -> dict:
        with self.lock:
            start = self.starts[self.rng.randrange(len(self.starts))]
            self.cur, self.prev, self.step_count, self.action = start.cur[None], start.prev[None], 0, "NOOP"
            return self._answer({"controller": 0.0, "decoder": 0.0})

    def state(self) -> dict:
        with self.lock:
            return self._answer({"controller": 0.0, "decoder": 0.0})

    def step(self, action: str) -> dict:
        index = ACTION_NAMES.index(action)
        with self.lock, torch.inference_mode():
            began = time.perf_counter()
            choice = self.sim.codes(self.cur, self.prev, torch.tensor([index]))
            coded = time.perf_counter()
            nxt = self.sim.draw(self.cur, choice, self.prev)
            decoded = time.perf_counter()
            self.prev, self.cur = self.cur, nxt
            self.step_count += 1
            self.action = action
            return self._answer({"controller": 1000 * (coded - began), "decoder": 1000 * (decoded - coded)})

    def _answer(self, timing: dict) -> dict:
        began = time.perf_counter()
        png = encode_png(self.cur[0].cpu())
        timing["png"] = 1000 * (time.perf_counter() - began)
        return {"step": self.step_count, "action": self.action,
                "frame": "data:image/png;base64," + base64.b64encode(png).decode("ascii"),
                "timing_ms": {name: round(value, 2) for name, value in timing.items()}}


def unavailable_page(problem: str) -> bytes:
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>Breakout in the model: not ready</title>"
            f"</head><body style='font-family:sans-serif;background:#111;color:#eee;padding:2em'>"
            f"<h1>The model cannot be played yet</h1><p id='problem' style='color:#f88'>{html.escape(problem)}</p>"
            f"<p>Train and extract the latent action model (<code>make demo</code>), train the controller "
            f"(<code>make controller</code>), then restart <code>make play</code>.</p></body></html>").encode()


class PlayHandler(BaseHTTPRequestHandler):
    """One connection's requests. The game (or the reason there is none) and the page's files are
    the server's: `self.server` is the PlayServer that made this handler."""

    server: PlayServer
    server_version = "BreakoutPlay/1"
    protocol_version = "HTTP/1.1"        # keep-alive: a held key sends one request per frame

    def setup(self) -> None:
        self.timeout = self.server.idle_timeout      # StreamRequestHandler puts it on the connection's socket
        super().setup()

    def log_message(self, format, *args):      # noqa: A002 - the base class's name
        pass                                     # one line per frame would drown the server's messages

    # ---------------------------------------------------------------- answers
    def send_bytes(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def send_json(self, status: int, payload: dict) -> None:
        self.send_bytes(status, json.dumps(payload).encode(), "application/json")

    def fail(self, status: HTTPStatus, reason: str) -> None:
        self.send_json(status, {"error": reason})

    # ---------------------------------------------------------------- methods
    def do_GET(self) -> None:                   # noqa: N802 - http.server's naming
        self.guarded(self.get)

    def do_POST(self) -> None:                  # noqa: N802
        self.guarded(self.post)

    def refuse_method(self) -> None:
        self.close_connection = True
        self.send_response(HTTPStatus.METHOD_NOT_ALLOWED)
        self.send_header("Allow", "GET, POST")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def __getattr__(self, name: str):
        # http.server answers a method it has no do_<METHOD> for with 501; here any other
        # method is the client's mistake: 405
        if name.startswith("do_"):
            return self.refuse_method
        raise AttributeError(name)

    def guarded(self, handle) -> None:
        try:
            handle(urlsplit(self.path).path)
        except TimeoutError:
            raise                                # http.server closes the connection, no answer
        except (BrokenPipeError, ConnectionResetError):
            pass
        except Exception as error:              # one line in the log, no traceback on the page
            print(f"play server: {self.command} {self.path[:80]!r} failed: {type(error).__name__}: {error}",
                  file=sys.stderr)
            self.close_connection = True
            self.fail(HTTPStatus.INTERNAL_SERVER_ERROR, "internal error (see the server's log)")

    def get(self, path: str) -> None:
        if path in ("/", "/index.html") and self.server.problem is not None:
            self.send_bytes(HTTPStatus.SERVICE_UNAVAILABLE, unavailable_page(self.server.problem),
                            CONTENT_TYPES[".html"])
        elif path in self.server.static:
            self.send_bytes(HTTPStatus.OK, *self.server.static[path])
        elif path == "/api/state":
            self.api(lambda game: game.state())
        elif path.startswith("/api/"):
            self.fail(HTTPStatus.METHOD_NOT_ALLOWED if path in ("/api/step", "/api/restart") else HTTPStatus.NOT_FOUND,
                      f"{path}: use POST" if path in ("/api/step", "/api/restart") else "no such API")
        else:
            self.fail(HTTPStatus.NOT_FOUND, "not found")

    def post(self, path: str) -> None:
        refusal = self.foreign_origin()
        if refusal:
            self.close_connection = True
            self.fail(HTTPStatus.FORBIDDEN, refusal)
            return
        body = self.read_body()
        if body is None:
            return
        if path == "/api/restart":
            self.api(lambda game: game.restart())
        elif path == "/api/step":
            action = self.parse_action(body)
            if action is not None:
                self.api(lambda game: game.step(action))
        else:
            self.fail(HTTPStatus.NOT_FOUND, "not found")

    def foreign_origin(self) -> str | None:
        """Why this POST is not from the page itself (None when it is). A browser sends Origin on
        every cross-site POST, and Host names what the user's browser thinks it is talking to
        (which defeats DNS rebinding: attacker.example resolving to 127.0.0.1)."""
        hosts = self.headers.get_all("Host") or []
        host = hosts[0].strip().lower() if len(hosts) == 1 else ""       # two Host headers: which one?
        if not self.server.serves_host(host):
            return f"Host {host or '(none)'!r} is not this server"
        origin = self.headers.get("Origin")
        if origin is not None and origin.strip().lower() != f"http://{host}":
            return f"POST from origin {origin[:80]!r} refused: only the play page itself may post"
        return None

    def read_body(self) -> bytes | None:
        length = self.headers.get("Content-Length", "0")
        if self.headers.get("Transfer-Encoding") or not CONTENT_LENGTH.fullmatch(length):
            self.close_connection = True         # where the body ends is unknown: the stream cannot go on
            self.fail(HTTPStatus.BAD_REQUEST, "bad Content-Length (ASCII digits; no Transfer-Encoding)")
            return None
        if int(length) > MAX_BODY_BYTES:
            self.close_connection = True
            self.fail(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"body over {MAX_BODY_BYTES} bytes")
            return None
        return self.rfile.read(int(length))

    def parse_action(self, body: bytes) -> str | None:
        try:
            action = json.loads(body or b"{}").get("action")
        except (ValueError, AttributeError, RecursionError):    # RecursionError: a body of '[[[[...' 
            self.fail(HTTPStatus.BAD_REQUEST, 'body must be JSON like {"action": "LEFT"}')
            return None
        if action not in ACTION_NAMES:
            self.fail(HTTPStatus.BAD_REQUEST, f"action must be one of {', '.join(ACTION_NAMES)}")
            return None
        return action

    def api(self, answer) -> None:
        """`answer(game)` as JSON; 503 with the reason when there is no game."""
        if self.server.game is None:
            self.fail(HTTPStatus.SERVICE_UNAVAILABLE, self.server.problem or "no game")
        else:
            self.send_json(HTTPStatus.OK, answer(self.server.game))


class PlayServer(ThreadingHTTPServer):
    """ThreadingHTTPServer with a listen backlog for bursts, daemon threads that never hold up
    shutdown, and the host names it answers to (`serves_host`); it holds what its handlers serve:
    the game (or the reason there is none) and the page's files."""

    request_queue_size = LISTEN_BACKLOG
    daemon_threads = True
    block_on_close = False                   # idle keep-alive connections must not delay server_close

    def __init__(self, host: str, port: int, game: Game | None, problem: str | None = None,
                 idle_timeout: float = IDLE_TIMEOUT_S):
        super().__init__((host, port), PlayHandler)
        self.started_host = host
        self.game, self.problem, self.idle_timeout = game, problem, idle_timeout
        self.static = load_static_files()

    def serves_host(self, host_header: str) -> bool:
        """Is `host_header` (lower case) this server, at its port (which a browser leaves out for 80)?
        Its names are the loopback ones and the host it was started with. Bound to every interface
        it is also reached by any of the machine's addresses, typed as an address, or by the
        machine's own name; never by some other DNS name, which could be an attacker's domain
        rebound to this machine."""
        name, port = split_host(host_header)
        own_port = str(self.server_address[1])
        if port != own_port and not (own_port == "80" and port == ""):
            return False
        if name in {*LOOPBACK_NAMES, bracketed(self.started_host)}:
            return True
        return self.started_host in WILDCARD_HOSTS and (is_ip_address(name) or name in machine_names())


def split_host(host_header: str) -> tuple[str, str]:
    """'127.0.0.1:8000' -> ('127.0.0.1', '8000'), '[::1]:8000' -> ('[::1]', '8000'), 'localhost' ->
    ('localhost', ''); anything else -> ('', '')."""
    match = re.fullmatch(r"(\[[0-9a-f:.]+\]|[a-z0-9.-]+)(?::([0-9]{1,5}))?", host_header)
    return (match.group(1), match.group(2) or "") if match else ("", "")


def bracketed(host: str) -> str:
    """An IPv6 address as a Host header writes it."""
    host = host.lower()
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def is_ip_address(name: str) -> bool:
    try:
        ipaddress.ip_address(name.removeprefix("[").removesuffix("]"))
        return True
    except ValueError:
        return False


def machine_names() -> set[str]:
    return {socket.gethostname().lower(), socket.getfqdn().lower()}


def make_server(host: str, port: int, game: Game | None, problem: str | None = None,
                idle_timeout: float = IDLE_TIMEOUT_S) -> PlayServer:
    """The play server on host:port (0: a free port); `idle_timeout` seconds of silence close a connection."""
    return PlayServer(host, port, game, problem, idle_timeout)
