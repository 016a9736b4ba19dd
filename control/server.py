"""The play page's server: standard library only (ThreadingHTTPServer), one game shared by the page.

Routes: GET / (the page), /play.js, /style.css (its files: a fixed allow-list read once at start,
so no URL, whatever its `..` or percent-encoding, can reach any other file); GET /api/state (the
current frame); POST /api/step {"action": "LEFT"|"RIGHT"|"FIRE"|"NOOP"}; POST /api/restart (a
random test frame). Every API answer is JSON: {"step", "action", "frame" (a PNG data URL),
"timing_ms": {"controller", "decoder", "png"}}. A request the server cannot serve gets a 4xx and a
one-line reason; an unexpected failure a 500 and one log line, never a traceback on the page.

Under load: a listen backlog sized for a burst of concurrent steps; a bounded pool of worker threads
(MAX_WORKERS) serving at most MAX_CONNECTIONS open connections (one past that gets 503 at once);
a connection idle for IDLE_TIMEOUT_S is closed, and so is one whose request (line, headers and
body) has not all arrived REQUEST_DEADLINE_S after its first byte, however slowly it drips; one
model step at a time (Game's lock): every tab the user opens plays the same game, their steps
interleaved in arrival order. A request whose length is ambiguous (Transfer-Encoding, more than one
Content-Length) is a 400 and ends the connection. POSTs are taken only
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
import queue
import random
import re
import socket
import sys
import threading
import time
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import torch
from PIL import Image

from pipeline.actions import ACTION_NAMES

from control.figures import to_uint8_image
from control.simulator import Choice, Simulator
from control.world import MAX_PAST_FRAMES

STATIC_DIR = Path(__file__).resolve().parent / "static"
STATIC_ROUTES = {"/": "index.html", "/index.html": "index.html", "/play.js": "play.js", "/style.css": "style.css"}
CONTENT_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                 ".css": "text/css; charset=utf-8"}
MAX_BODY_BYTES = 1024
CONTENT_LENGTH = re.compile(r"[0-9]{1,9}")          # ASCII digits only: str.isdigit() also takes '²'
LISTEN_BACKLOG = 256                                 # socketserver's default of 5 resets a burst of steps
IDLE_TIMEOUT_S = 30.0                                # a kept-alive connection that sends nothing is closed
REQUEST_DEADLINE_S = 10.0                            # a request's line, headers and body, from its first byte
MAX_WORKERS = 32                                     # threads serving connections (one model step runs at a time)
MAX_CONNECTIONS = 256                                # open at once, served or waiting; past it: 503
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
    before: Choice | None = None     # the recorded codes of the transition into `cur` (batch of 1)


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
            self.older = []                  # frames before t-1, for a world model that sees them
            self.before = start.before
            return self._answer({"controller": 0.0, "decoder": 0.0})

    def state(self) -> dict:
        with self.lock:
            return self._answer({"controller": 0.0, "decoder": 0.0})

    def step(self, action: str) -> dict:
        index = ACTION_NAMES.index(action)
        with self.lock, torch.inference_mode():
            began = time.perf_counter()
            choice = self.sim.codes(self.cur, self.prev, torch.tensor([index]), before=self.before)
            coded = time.perf_counter()
            nxt = self.sim.draw(self.cur, choice, self.prev, self.older)
            decoded = time.perf_counter()
            self.older = [*self.older, self.prev][-MAX_PAST_FRAMES:]
            self.prev, self.cur, self.before = self.cur, nxt, choice
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
        plain, self.rfile = self.rfile, io.BufferedReader(
            DeadlineReader(self.connection, self.server.idle_timeout, self.server.request_deadline))
        plain.close()                                # its reference would keep the socket open after close

    def handle_one_request(self) -> None:
        self.rfile.raw.await_request()           # idle until the next request's first byte, then its deadline
        super().handle_one_request()

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
            path = urlsplit(self.path).path
        except ValueError:                       # e.g. 'http://[::1/': a bracket that never closes
            self.close_connection = True
            self.fail(HTTPStatus.BAD_REQUEST, "unreadable request target")
            return
        try:
            handle(path)
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
        if self.headers.get("Transfer-Encoding") or self.headers.get_all("Content-Length", ["0"]) != ["0"]:
            self.close_connection = True         # a GET's body is not read: what follows it is no request
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
        lengths = self.headers.get_all("Content-Length") or ["0"]
        length = lengths[0]
        if self.headers.get("Transfer-Encoding") or len(lengths) > 1 or not CONTENT_LENGTH.fullmatch(length):
            # where the body ends is unknown (a proxy may have read another length): the stream cannot go on
            self.close_connection = True
            self.fail(HTTPStatus.BAD_REQUEST, "bad Content-Length (one header, ASCII digits; no Transfer-Encoding)")
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


class DeadlineReader(io.RawIOBase):
    """A connection's bytes for its handler's buffered reader, each wait bounded: waiting for a
    request, by the idle timeout; once its first byte is in, by what is left of the request deadline,
    so a client that drips a header line every few seconds cannot hold a worker (a plain socket
    timeout restarts with every byte). Writes keep the idle timeout."""

    def __init__(self, sock: socket.socket, idle_timeout: float, deadline: float):
        self.sock, self.idle_timeout, self.deadline = sock, idle_timeout, deadline
        self.started: float | None = None

    def await_request(self) -> None:
        self.started = None

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        if self.started is None:
            timeout = self.idle_timeout
        else:
            timeout = self.started + self.deadline - time.monotonic()
            if timeout <= 0:
                raise TimeoutError(f"request not complete {self.deadline:g} s after its first byte")
        self.sock.settimeout(timeout)
        try:
            received = self.sock.recv_into(buffer)
        finally:
            self.sock.settimeout(self.idle_timeout)
        if received and self.started is None:
            self.started = time.monotonic()
        return received


class WorkerPool:
    """At most `size` daemon threads running `serve(job)` for queued jobs; a thread is started only
    while jobs wait for one, so an idle server holds few. Daemon: a connection a worker is still
    serving never holds up the process's exit."""

    def __init__(self, size: int, serve):
        self.size, self.serve = size, serve
        self.jobs: queue.SimpleQueue = queue.SimpleQueue()
        self.lock = threading.Lock()
        self.threads: list[threading.Thread] = []
        self.waiting_jobs = self.idle_threads = 0

    def submit(self, job) -> None:
        with self.lock:
            self.waiting_jobs += 1
            if self.waiting_jobs > self.idle_threads and len(self.threads) < self.size:
                thread = threading.Thread(target=self._work, name=f"play-worker-{len(self.threads)}", daemon=True)
                self.threads.append(thread)
                thread.start()
        self.jobs.put(job)

    def _work(self) -> None:
        while True:
            with self.lock:
                self.idle_threads += 1
            job = self.jobs.get()
            with self.lock:
                self.idle_threads -= 1
                self.waiting_jobs -= 1
            if job is None:
                return
            self.serve(job)

    def close(self) -> None:
        with self.lock:
            for _ in self.threads:
                self.jobs.put(None)


class PlayServer(HTTPServer):
    """An HTTP server with a listen backlog for bursts, a bounded pool of worker threads and a cap on
    open connections (past it, 503 at once: a flood of slow connections costs sockets up to the cap,
    never threads past the pool), and the host names it answers to (`serves_host`); it holds what
    its handlers serve: the game (or the reason there is none) and the page's files."""

    request_queue_size = LISTEN_BACKLOG

    def __init__(self, host: str, port: int, game: Game | None, problem: str | None = None,
                 idle_timeout: float = IDLE_TIMEOUT_S, request_deadline: float = REQUEST_DEADLINE_S,
                 workers: int = MAX_WORKERS, max_connections: int = MAX_CONNECTIONS):
        super().__init__((host, port), PlayHandler)
        self.started_host = host
        self.game, self.problem, self.idle_timeout = game, problem, idle_timeout
        self.request_deadline, self.max_connections = request_deadline, max_connections
        self.static = load_static_files()
        self.pool = WorkerPool(workers, self._serve_connection)
        self.connections: set[socket.socket] = set()
        self.connections_lock = threading.Lock()

    def process_request(self, request: socket.socket, client_address) -> None:
        """Called by serve_forever for each accepted connection: to a worker, or 503 when full."""
        with self.connections_lock:
            full = len(self.connections) >= self.max_connections
            if not full:
                self.connections.add(request)
        if full:
            self.refuse_busy(request)
        else:
            self.pool.submit((request, client_address))

    def _serve_connection(self, job) -> None:
        request, client_address = job
        try:
            self.finish_request(request, client_address)
        except Exception:                       # noqa: BLE001 - one line, and the server goes on
            self.handle_error(request, client_address)
        finally:
            with self.connections_lock:
                self.connections.discard(request)
            self.shutdown_request(request)

    def refuse_busy(self, request: socket.socket) -> None:
        body = json.dumps({"error": f"server busy: {self.max_connections} connections open; try again"}).encode()
        head = (f"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\nRetry-After: 1\r\nConnection: close\r\n\r\n").encode()
        try:
            request.settimeout(1.0)              # the accepting thread must not wait on a stalled client
            request.sendall(head + body)
        except OSError:
            pass
        finally:
            self.shutdown_request(request)

    def handle_error(self, request, client_address) -> None:
        error = sys.exc_info()[1]
        print(f"play server: connection from {client_address[0] if client_address else '?'} failed: "
              f"{type(error).__name__}: {error}", file=sys.stderr)

    def server_close(self) -> None:
        """Stop listening, end the workers, and close every connection still open (a worker blocked
        reading one returns at once)."""
        super().server_close()
        self.pool.close()
        with self.connections_lock:
            for connection in self.connections:
                try:
                    connection.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

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


def make_server(host: str, port: int, game: Game | None, problem: str | None = None, **limits) -> PlayServer:
    """The play server on host:port (0: a free port). `limits` (PlayServer's): idle_timeout (seconds of
    silence that close a connection), request_deadline, workers, max_connections."""
    return PlayServer(host, port, game, problem, **limits)
