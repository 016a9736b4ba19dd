"""The play page's server: uvicorn (its h11 protocol, asyncio) serving a small Starlette-style ASGI
app, one game shared by the page.

Routes: GET / (the page), /play.js, /style.css (its files: a fixed allow-list read once at start,
so no URL, whatever its `..` or percent-encoding, can reach any other file); GET /api/state (the
current frame); POST /api/step {"action": "LEFT"|"RIGHT"|"FIRE"|"NOOP"}; POST /api/restart (a
random test frame). Every API answer is JSON: {"step", "action", "frame" (a PNG data URL),
"timing_ms": {"controller", "decoder", "png"}}. A request the server cannot serve gets a 4xx and a
one-line reason; an unexpected failure a 500 and one log line, never a traceback on the page.

Under load: connections are accepted and read asynchronously (one event loop, no thread per
connection), so idle or slow sockets cost a file descriptor each, not a worker. A connection that
sends nothing for IDLE_TIMEOUT_S is closed, and so is one whose request (line, headers and body) has
not all arrived REQUEST_DEADLINE_S after its first byte, however slowly it drips. Each client
address has PER_CLIENT_READING connections read at once; its further ones wait, unread, in arrival
order (up to PER_CLIENT_WAITING; past that 429), so one address's sockets cannot starve another's.
Past MAX_CONNECTIONS open connections in all (a true overload) a new one gets 503 at once. The model
steps in one worker thread, one step at a time (and Game's lock): every tab the user opens plays the
same game, their steps interleaved in arrival order.

A request whose length is ambiguous (any Transfer-Encoding header, even an empty one; more than one
Content-Length, or one that is not ASCII digits) is a 400 and ends the connection. POSTs are taken
only from the page's own origin (Origin, when sent, must match the Host header, which must name this
server: a loopback name or the host it was started with, at its port; bound to every interface,
also an IP address or the machine's name), so no other web page the user has open can drive it.

Without a usable LAM checkpoint, controller or test frames the server still starts, and the page
(and every API call, with 503) says what is missing and how to make it.
"""
from __future__ import annotations

import asyncio
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
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path
from typing import Callable

import h11
import torch
import uvicorn
from PIL import Image
from starlette.requests import Request
from starlette.responses import Response
from uvicorn.protocols.http.h11_impl import H11Protocol

from pipeline.actions import ACTION_NAMES

from control.figures import to_uint8_image
from control.simulator import Choice, Simulator
from control.world import MAX_PAST_FRAMES

STATIC_DIR = Path(__file__).resolve().parent / "static"
STATIC_ROUTES = {"/": "index.html", "/index.html": "index.html", "/play.js": "play.js", "/style.css": "style.css"}
CONTENT_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                 ".css": "text/css; charset=utf-8"}
MAX_BODY_BYTES = 1024
CONTENT_LENGTH = re.compile(rb"[0-9]{1,9}")         # ASCII digits only: str.isdigit() also takes '²'
LISTEN_BACKLOG = 256                                 # a burst of steps waits in the kernel until accepted
IDLE_TIMEOUT_S = 5.0                                 # a connection that sends nothing is closed
REQUEST_DEADLINE_S = 10.0                            # a request's line, headers and body, from its first byte
PER_CLIENT_READING = 16                              # connections of one address read at once
PER_CLIENT_WAITING = 256                             # its further ones held unread, in order; past them: 429
MAX_CONNECTIONS = 1024                               # open at once, all clients; past it: 503
SHUTDOWN_GRACE_S = 2.0                               # a stopping server waits this long for answers in flight
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
        self.made_from_other: list[str] = []     # what was allowed with --allow-other-checkpoint (play.py)
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


@dataclass(frozen=True)
class Limits:
    """What one connection and one client address may hold (the module docstring says why)."""

    idle_timeout: float = IDLE_TIMEOUT_S
    request_deadline: float = REQUEST_DEADLINE_S
    per_client_reading: int = PER_CLIENT_READING
    per_client_waiting: int = PER_CLIENT_WAITING
    max_connections: int = MAX_CONNECTIONS


# ------------------------------------------------------------------------------------ the app
def reply(status: int, body: bytes, content_type: str, close: bool = False) -> Response:
    headers = {"Content-Type": content_type, "Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"}
    if close:
        headers["Connection"] = "close"
    return Response(body, status_code=status, headers=headers)


def reply_json(status: int, payload: dict, close: bool = False) -> Response:
    return reply(status, json.dumps(payload).encode(), "application/json", close)


def fail(status: int, reason: str, close: bool = False) -> Response:
    return reply_json(status, {"error": reason}, close)


class PlayApp:
    """The ASGI app: routes, the Host and Origin checks, and the game's answers. The model runs in
    `model`, a pool of one thread, so the event loop keeps accepting and reading meanwhile."""

    def __init__(self, server: "PlayServer"):
        self.server = server
        self.static = load_static_files()
        self.model = ThreadPoolExecutor(1, thread_name_prefix="play-model")

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return
        request = Request(scope, receive)
        try:
            response = await self.answer(request)
        except Exception as error:              # noqa: BLE001 - one line in the log, no traceback on the page
            print(f"play server: {request.method} {scope['path'][:80]!r} failed: {type(error).__name__}: {error}",
                  file=sys.stderr)
            response = fail(HTTPStatus.INTERNAL_SERVER_ERROR, "internal error (see the server's log)", close=True)
        await response(scope, receive, send)

    async def answer(self, request: Request) -> Response:
        path = request.scope["path"]
        if request.method == "GET":
            return await self.get(request, path)
        if request.method == "POST":
            return await self.post(request, path)
        # any other method is the client's mistake: 405, not http.server's 501
        return Response(b"", status_code=HTTPStatus.METHOD_NOT_ALLOWED, headers={"Allow": "GET, POST",
                                                                                  "Connection": "close"})

    async def get(self, request: Request, path: str) -> Response:
        # a GET's body is read (its framing is unambiguous: the protocol refused any other), but a
        # client that sends one is not a browser: its connection ends with this answer
        close = request.headers.getlist("content-length") not in ([], ["0"])
        if path in ("/", "/index.html") and self.server.problem is not None:
            return reply(HTTPStatus.SERVICE_UNAVAILABLE, unavailable_page(self.server.problem),
                         CONTENT_TYPES[".html"], close)
        if path in self.static:
            return reply(HTTPStatus.OK, *self.static[path], close)
        if path == "/api/state":
            return await self.api(lambda game: game.state(), close)
        if path in ("/api/step", "/api/restart"):
            return fail(HTTPStatus.METHOD_NOT_ALLOWED, f"{path}: use POST", close)
        return fail(HTTPStatus.NOT_FOUND, "no such API" if path.startswith("/api/") else "not found", close)

    async def post(self, request: Request, path: str) -> Response:
        refusal = foreign_origin(request, self.server.serves_host)
        if refusal:
            return fail(HTTPStatus.FORBIDDEN, refusal, close=True)
        length = int((request.headers.getlist("content-length") or ["0"])[0])   # one, of digits: the protocol's check
        if length > MAX_BODY_BYTES:
            return fail(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"body over {MAX_BODY_BYTES} bytes", close=True)
        body = await request.body()
        if path == "/api/restart":
            return await self.api(lambda game: game.restart())
        if path == "/api/step":
            action = parse_action(body)
            if action not in ACTION_NAMES:
                return fail(HTTPStatus.BAD_REQUEST, action)
            return await self.api(lambda game: game.step(action))
        return fail(HTTPStatus.NOT_FOUND, "not found")

    async def api(self, answer: Callable[["Game"], dict], close: bool = False) -> Response:
        """`answer(game)`, run in the model's thread, as JSON; 503 with the reason when there is no game."""
        game = self.server.game
        if game is None:
            return fail(HTTPStatus.SERVICE_UNAVAILABLE, self.server.problem or "no game", close)
        payload = await asyncio.get_running_loop().run_in_executor(self.model, answer, game)
        return reply_json(HTTPStatus.OK, payload, close)


def parse_action(body: bytes) -> str:
    """The action a step's body names, or (not one of ACTION_NAMES) the reason it names none."""
    try:
        action = json.loads(body or b"{}").get("action")
    except (ValueError, AttributeError, RecursionError):    # RecursionError: a body of '[[[[...'
        return 'body must be JSON like {"action": "LEFT"}'
    return action if action in ACTION_NAMES else f"action must be one of {', '.join(ACTION_NAMES)}"


def foreign_origin(request: Request, serves_host: Callable[[str], bool]) -> str | None:
    """Why this POST is not from the page itself (None when it is). A browser sends Origin on every
    cross-site POST, and Host names what the user's browser thinks it is talking to (which defeats
    DNS rebinding: attacker.example resolving to 127.0.0.1)."""
    hosts = request.headers.getlist("host")
    host = hosts[0].strip().lower() if len(hosts) == 1 else ""       # two Host headers: which one?
    if not serves_host(host):
        return f"Host {host or '(none)'!r} is not this server"
    origin = request.headers.get("origin")
    if origin is not None and origin.strip().lower() != f"http://{host}":
        return f"POST from origin {origin[:80]!r} refused: only the play page itself may post"
    return None


# ------------------------------------------------------------------------------------ connections
def framing_problem(head: bytes) -> str | None:
    """What makes a request's length ambiguous, read off its raw head (None: nothing, or the head is
    not all in yet). h11 alone would merge two equal Content-Length headers and take
    `Transfer-Encoding: chunked` over a Content-Length; a proxy in front may read the stream another
    way, so any Transfer-Encoding and anything but one Content-Length of ASCII digits is refused."""
    end = re.search(rb"\r?\n\r?\n", head)
    if end is None:
        return None
    lengths, encodings = [], 0
    for line in re.split(rb"\r?\n", head[:end.start()])[1:]:
        name, colon, value = line.partition(b":")
        name = name.strip().lower()
        if colon and name == b"content-length":
            lengths.append(value.strip())
        elif colon and name == b"transfer-encoding":
            encodings += 1
    if encodings or len(lengths) > 1 or (lengths and not CONTENT_LENGTH.fullmatch(lengths[0])):
        return "bad Content-Length (one header, ASCII digits; no Transfer-Encoding)"
    return None


class ClientSlots:
    """Who may be read: at most `reading` connections of one client address at once, `waiting`
    more held unread in arrival order, `total` open connections in all."""

    READING, WAITING = "reading", "waiting"

    def __init__(self, limits: Limits):
        self.limits = limits
        self.open = 0
        self.reading: Counter[str] = Counter()
        self.queued: dict[str, deque] = {}

    def admit(self, client: str, connection) -> str | tuple[int, str]:
        """READING, WAITING, or the (status, reason) that refuses the connection."""
        if self.open >= self.limits.max_connections:
            return HTTPStatus.SERVICE_UNAVAILABLE, f"server busy: {self.limits.max_connections} connections open; try again"
        queue = self.queued.setdefault(client, deque())
        if self.reading[client] < self.limits.per_client_reading:
            self.reading[client] += 1
            verdict = self.READING
        elif len(queue) < self.limits.per_client_waiting:
            queue.append(connection)
            verdict = self.WAITING
        else:
            return (HTTPStatus.TOO_MANY_REQUESTS,
                    f"{self.limits.per_client_reading + self.limits.per_client_waiting} connections open from {client}")
        self.open += 1
        return verdict

    def release(self, client: str, connection, was_reading: bool):
        """A connection closed; the client's next waiting connection, which may now be read, or None."""
        self.open -= 1
        queue = self.queued.get(client, deque())
        if not was_reading:
            queue.remove(connection)
            return None
        if queue:
            return queue.popleft()             # takes over the slot
        self.reading[client] -= 1
        if not self.reading[client]:
            del self.reading[client]
            self.queued.pop(client, None)
        return None


class GuardedProtocol(H11Protocol):
    """uvicorn's h11 protocol with what a socket open to the network needs on top: a client's slot
    (ClientSlots), a timer that closes a connection idle before its first request, a deadline for
    each request from its first byte, and the framing check. After a response uvicorn's own
    keep-alive timeout (the same idle timeout) takes over."""

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self.play: PlayServer = self.config.play
        self.address = self.client[0] if self.client else "?"
        self.timer: asyncio.TimerHandle | None = None
        self.in_request = self.peer_done = False
        verdict = self.play.slots.admit(self.address, self)
        self.slot = verdict if verdict in (ClientSlots.READING, ClientSlots.WAITING) else None
        if verdict == ClientSlots.READING:
            self.start_reading()
        elif verdict == ClientSlots.WAITING:
            transport.pause_reading()
        else:
            self.refuse(*verdict)

    def start_reading(self) -> None:
        self.slot = ClientSlots.READING
        self.transport.resume_reading()
        self.arm(self.play.limits.idle_timeout)

    def arm(self, seconds: float | None) -> None:
        """Close the connection `seconds` from now (None: no timer)."""
        if self.timer is not None:
            self.timer.cancel()
        self.timer = None if seconds is None else self.loop.call_later(seconds, self.transport.close)

    def connection_lost(self, exc) -> None:
        self.arm(None)
        if self.slot is not None:
            successor = self.play.slots.release(self.address, self, self.slot == ClientSlots.READING)
            self.slot = None
            if successor is not None:
                successor.start_reading()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self.conn.their_state is h11.IDLE and not self.in_request:
            self.in_request = True                   # the request's deadline runs from its first byte
            self.arm(self.play.limits.request_deadline)
        super().data_received(data)

    def handle_events(self) -> None:
        if self.conn.their_state is h11.IDLE:
            problem = framing_problem(self.conn.trailing_data[0])
            if problem:
                self.refuse(HTTPStatus.BAD_REQUEST, problem)
                return
        super().handle_events()
        if self.in_request and self.conn.their_state in (h11.DONE, h11.MUST_CLOSE, h11.ERROR):
            self.in_request = False                  # all in: the model may take its time
            self.arm(None)

    def eof_received(self):
        """The client is done sending: keep the connection only to write an answer in flight."""
        self.peer_done = True
        return True if self.cycle is not None and not self.cycle.response_complete else None

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.peer_done:
            self.transport.close()

    def refuse(self, status: int, reason: str) -> None:
        """Answer `status` with `reason` and close, without reading further."""
        body = json.dumps({"error": reason}).encode()
        head = (f"HTTP/1.1 {int(status)} {HTTPStatus(status).phrase}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\nRetry-After: 1\r\nConnection: close\r\n\r\n").encode()
        self.transport.write(head + body)
        self.transport.close()


# ------------------------------------------------------------------------------------ the server
class PlayServer:
    """The page's server on host:port, bound when made (a port in use is an OSError here). Run it
    with `serve_forever()` (in any thread: in the main one Ctrl-C stops it), stop it from another
    thread with `shutdown()`; `server_close()` lets go of what is left."""

    def __init__(self, host: str, port: int, game: Game | None, problem: str | None = None, limits: Limits = Limits()):
        self.started_host, self.game, self.problem, self.limits = host, game, problem, limits
        self.slots = ClientSlots(limits)
        self.socket = listening_socket(host, port)
        self.server_address = self.socket.getsockname()[:2]
        self.app = PlayApp(self)
        config = uvicorn.Config(self.app, http=GuardedProtocol, ws="none", lifespan="off", log_level="error",
                                access_log=False, proxy_headers=False, server_header=False,
                                timeout_keep_alive=limits.idle_timeout, backlog=LISTEN_BACKLOG,
                                timeout_graceful_shutdown=SHUTDOWN_GRACE_S)
        config.play = self                        # what each connection's protocol reads its limits from
        self.uvicorn = uvicorn.Server(config)
        self.serving = threading.Event()
        self.stopped = threading.Event()

    def serve_forever(self) -> None:
        self.serving.set()
        try:
            self.uvicorn.run(sockets=[self.socket])
        finally:
            self.stopped.set()

    def shutdown(self) -> None:
        """Stop serving (from another thread) and wait until it has."""
        self.uvicorn.should_exit = True
        if self.serving.is_set():
            self.stopped.wait(30)

    def server_close(self) -> None:
        self.socket.close()
        self.app.model.shutdown(wait=False, cancel_futures=True)

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


def listening_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(LISTEN_BACKLOG)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


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
    """The play server on host:port (0: a free port). `limits` (Limits' fields): idle_timeout (seconds
    of silence that close a connection), request_deadline, per_client_reading, per_client_waiting,
    max_connections."""
    return PlayServer(host, port, game, problem, Limits(**limits))
