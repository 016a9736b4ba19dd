"""The play server's limits (control/server.py): a bounded pool of workers and a cap on open
connections (503 past it), a deadline for a request's line, headers and body however slowly they
drip, one unambiguous Content-Length; and, property-tested, any bytes a client sends get an answer
of 4xx / 2xx / 503 or a closed connection, never a 500 or a traceback."""
from __future__ import annotations

import select
import socket
import threading

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings, strategies as st

from control.server import Game, StartFrame, make_server
from control.simulator import Choice


class StillSimulator:
    """A stand-in simulator: the codes are zeros and the next frame is frame t (the server's limits
    are under test here, not a model)."""

    def codes(self, cur, prev, action, random_codes=None, before=None):
        return Choice(torch.zeros(len(cur), 7, 5, dtype=torch.int64), None)

    def draw(self, cur, choice, prev=None, older=None):
        return cur.clone()


def still_game() -> Game:
    frame = torch.zeros(1, 210, 160)
    return Game(StillSimulator(), [StartFrame(frame, frame)], seed=0)


def start(game=None, **limits):
    server = make_server("127.0.0.1", 0, game if game is not None else still_game(), **limits)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def stop(server) -> None:
    server.shutdown()
    server.server_close()


def connect(server) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.server_address[1]), timeout=30)


def answer_of(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (a reset, from a close with input
    left unread, is a close too)."""
    chunks = []
    try:
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    except ConnectionResetError:
        pass
    return b"".join(chunks)


def closed_by_server(sock: socket.socket, wait: float) -> bool:
    """Has the server closed `sock` within `wait` seconds (EOF or reset)?"""
    readable, _, _ = select.select([sock], [], [], wait)
    if not readable:
        return False
    try:
        return sock.recv(65536) == b""
    except ConnectionResetError:
        return True


# ------------------------------------------------------------------------------------ limits
def test_a_flood_of_stalled_connections_holds_a_bounded_pool_and_the_rest_get_503():
    """20 connections that begin a request and never finish it, against 4 workers and a cap of 8
    open connections: 4 threads serve, 4 connections wait, 12 are answered 503 at once, and once the
    flood goes the server answers again."""
    server = start(workers=4, max_connections=8, request_deadline=120, idle_timeout=120)
    before = threading.active_count()
    flood = [connect(server) for _ in range(20)]
    try:
        for sock in flood:
            sock.sendall(b"POST /api/step HTTP/1.1\r\n")             # a request begun, never finished
        answered: dict[socket.socket, bytes] = {}
        for _ in range(60):                                           # until 12 answers (or 60 rounds)
            readable, _, _ = select.select([s for s in flood if s not in answered], [], [], 1.0)
            for sock in readable:
                answered[sock] = answer_of(sock)
            if len(answered) >= 12:
                break
        assert len(answered) == 12 and all(a.startswith(b"HTTP/1.1 503 ") for a in answered.values()), answered
        assert b"server busy" in next(iter(answered.values()))
        held = [sock for sock in flood if sock not in answered]
        assert not select.select(held, [], [], 0)[0]                  # the 8 within the cap: held, unanswered
        assert len(server.pool.threads) == 4 and threading.active_count() - before <= 4
    finally:
        for sock in flood:
            sock.close()
    try:
        for _ in range(60):                   # the held connections are let go as their clients leave
            with connect(server) as sock:
                sock.sendall(b"GET /api/state HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
                if answer_of(sock).startswith(b"HTTP/1.1 200 "):
                    break
        else:
            pytest.fail("the server never answered again after the flood")
    finally:
        stop(server)


def test_a_request_that_drips_in_is_cut_at_its_deadline():
    """A byte of a header every 0.1 s keeps a plain socket timeout (here 30 s) from ever firing
    (and stays far from the limits on header count and line length); the request deadline (0.5 s
    from its first byte) closes the connection all the same."""
    server = start(request_deadline=0.5, idle_timeout=30)
    try:
        with connect(server) as sock:
            sock.sendall(b"GET / HTTP/1.1\r\nX-Slow: ")
            closed = False
            for _ in range(300):                                      # up to 30 s of dripping
                try:
                    sock.sendall(b"a")
                except (BrokenPipeError, ConnectionResetError):
                    closed = True
                    break
                if closed_by_server(sock, 0.1):
                    closed = True
                    break
            assert closed, "a dripping request held its connection past the deadline"
    finally:
        stop(server)


@pytest.mark.parametrize("lengths", [["18", "2"], ["18", "18"], ["18, 18"], ["18,2"]])
def test_duplicate_or_conflicting_content_length_is_400(lengths):
    """Whichever length a server picked, another reader of the stream (a proxy) may pick another:
    the request is refused, not played, and the connection ends."""
    game = still_game()
    server = start(game, idle_timeout=30)
    try:
        port = server.server_address[1]
        head = b"".join(b"Content-Length: %s\r\n" % value.encode() for value in lengths)
        with connect(server) as sock:
            sock.sendall(b'POST /api/step HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n%s\r\n{"action": "LEFT"}' % (port, head))
            answer = answer_of(sock)                                  # and the connection is closed
        assert answer.startswith(b"HTTP/1.1 400 ") and b"bad Content-Length" in answer
        assert answer.count(b"HTTP/1.1") == 1 and game.step_count == 0
    finally:
        stop(server)


def test_a_get_with_a_body_ends_its_connection():
    """A GET's body is not read, so what follows it on the connection is not taken as a request."""
    game = still_game()
    server = start(game)
    try:
        port = server.server_address[1]
        smuggled = b"POST /api/step HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nContent-Length: 2\r\n\r\n{}" % port
        with connect(server) as sock:
            sock.sendall(b"GET /api/state HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nContent-Length: %d\r\n\r\n%s"
                         % (port, len(smuggled), smuggled))
            answer = answer_of(sock)
        assert answer.count(b"HTTP/1.1 ") == 1 and answer.startswith(b"HTTP/1.1 200 ") and game.step_count == 0
    finally:
        stop(server)


# ------------------------------------------------------------------------------------ any bytes
@pytest.fixture(scope="module")
def idle_server():
    """A server whose handler the property test drives directly, over a socket pair."""
    server = make_server("127.0.0.1", 0, still_game(), idle_timeout=5, request_deadline=5)
    yield server
    server.server_close()


def exchange(server, data: bytes) -> bytes:
    """`data` sent on a fresh connection (then end of input); everything the server answers."""
    ours, theirs = socket.socketpair()
    with ours, theirs:
        theirs.sendall(data)
        theirs.shutdown(socket.SHUT_WR)
        with server.connections_lock:
            server.connections.add(ours)
        worker = threading.Thread(target=server._serve_connection, args=((ours, ("127.0.0.1", 0)),))
        worker.start()
        theirs.settimeout(30)
        answer = answer_of(theirs)
        worker.join(30)
        assert not worker.is_alive()
    return answer


TOKEN = st.text(st.characters(codec="latin-1"), max_size=12)
METHOD = st.sampled_from(["GET", "POST"]) | st.sampled_from(["PUT", "HEAD", "post", "BREW", ""]) | TOKEN
PATH = st.sampled_from(["/", "/api/step", "/api/restart", "/api/state", "/play.js", "//[", "/%2e%2e/x", "*",
                        "http://[::1/"]) | TOKEN
VERSION = st.sampled_from(["HTTP/1.1", "HTTP/1.0", "HTTP/2.0", "HTTP/0.9", "", "HTTP/1.1 x", "HTTP/x"])
HEADER_NAME = st.sampled_from(["Host", "Origin", "Content-Length", "Transfer-Encoding", "Connection", "Expect"]) | TOKEN
HEADER_VALUE = st.sampled_from(["HOST", "http://HOST", "0", "2", "18", "-1", "2, 2", "chunked", "close",
                                "100-continue", "99999999999"]) | TOKEN
BODY = st.sampled_from([b"", b"{}", b'{"action": "LEFT"}', b'{"action": "JUMP"}', b"[" * 2000, b"\xff\xfe"]) \
    | st.binary(max_size=40)
REQUEST = st.builds(lambda method, path, version, headers, body: (
    f"{method} {path} {version}".strip().encode("latin-1", "replace") + b"\r\n"
    + b"".join(f"{name}: {value}\r\n".encode("latin-1", "replace") for name, value in headers) + b"\r\n" + body),
    METHOD, PATH, VERSION, st.lists(st.tuples(HEADER_NAME, HEADER_VALUE), max_size=5), BODY)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                   HealthCheck.too_slow])
@given(parts=st.lists(REQUEST | st.binary(max_size=120), min_size=1, max_size=3))
@example(parts=[b"GET http://[::1/ HTTP/1.1\r\n\r\n"])          # found once: urlsplit's ValueError was a 500
@example(parts=[b"GET /api/step HTTP/1.1\r\n\r\n{}"])                # a line after a request: no status line (HTTP/0.9)
@example(parts=[b"POST /api/step HTTP/1.1\r\nHost: HOST\r\nContent-Length: 18\r\n\r\n", b'{"action": "LEFT"}'])
def test_any_bytes_get_a_status_or_a_close_never_a_500(idle_server, parts, capsys):
    host = f"127.0.0.1:{idle_server.server_address[1]}".encode()
    answer = exchange(idle_server, b"".join(parts).replace(b"HOST", host))
    statuses = [line.split(b" ")[1] for line in answer.split(b"\r\n") if line.startswith(b"HTTP/1.")
                and len(line.split(b" ")) > 2 and line.split(b" ")[1].isdigit()]
    assert all(status[:1] in (b"2", b"4") or status == b"503" for status in statuses), answer[:300]
    err = capsys.readouterr().err
    assert "Traceback" not in err and "failed" not in err, err
