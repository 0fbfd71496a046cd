"""`starcoder-jax serve`: the HTTP front of the engine (Python's threading HTTP server).

Endpoints: POST /v1/completions (OpenAI), POST /infill (llama.cpp), GET
/v1/models, GET /health, GET /metrics (Prometheus text). Each connection
runs in its own thread, which submits to the engine and waits on its
request's events; streamed responses are server-sent events written as
HTTP/1.1 chunks. A client that disconnects cancels its requests (noticed
when a chunk cannot be written, or, while a non-streamed request runs, when
its socket reads as closed). Errors have OpenAI's error body and a 4xx
status; the server goes on serving.

Limits: bodies over `max_body` bytes get 413, a full engine queue 429 with
Retry-After. `drain()` (SIGTERM in the command) stops taking requests (503),
lets the live ones finish, then stops the server.
"""

from __future__ import annotations

import json
import queue
import select
import signal
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from starcoder_jax.serve import api
from starcoder_jax.serve.engine import Closed, Engine, QueueFull, Request
from starcoder_jax.tokenizer import Tokenizer

MAX_BODY = 1 << 20  # bytes of a request body at most
POLL = 0.05  # seconds between checks of a waiting client's socket


class Server:
    """Serves `engine` over HTTP on (host, port); port 0 picks a free one (`port` after start)."""

    def __init__(self, engine: Engine, tokenizer: Tokenizer, *, model_name: str, host: str = "127.0.0.1",
                 port: int = 8000, max_body: int = MAX_BODY, fim_mode: str = "psm", verbose: bool = False):
        self.engine, self.tokenizer, self.model_name = engine, tokenizer, model_name
        self.max_body, self.fim_mode, self.verbose = max_body, fim_mode, verbose
        self.draining = False
        self.created = int(time.time())
        self._lock = threading.Lock()
        self.http = {}  # (endpoint, status) -> count
        self.httpd = _HTTPServer((host, port), _Handler)
        self.httpd.app = self
        self.host, self.port = self.httpd.server_address[:2]

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def serve_forever(self) -> None:
        self.httpd.serve_forever(poll_interval=0.2)

    def start(self) -> threading.Thread:
        """serve_forever in a daemon thread (tests, notebooks)."""
        thread = threading.Thread(target=self.serve_forever, name="starcoder-jax-http", daemon=True)
        thread.start()
        return thread

    def drain(self, timeout: float | None = None) -> None:
        """Refuses new requests, waits for the queued and live ones, then stops serving."""
        self.draining = True
        self.engine.drain(timeout)
        self.httpd.shutdown()

    def stop(self) -> None:
        self.draining = True
        self.httpd.shutdown()
        self.httpd.server_close()
        self.engine.close()

    def drain_on_sigterm(self) -> None:
        """SIGTERM (and SIGINT) drain the server from a thread; the main thread's serve_forever returns."""
        def handler(signum, frame):
            threading.Thread(target=self.drain, name="starcoder-jax-drain", daemon=True).start()

        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)

    def count(self, endpoint: str, status: int) -> None:
        with self._lock:
            self.http[(endpoint, status)] = self.http.get((endpoint, status), 0) + 1

    def metrics_text(self) -> str:
        e, m = self.engine, self.engine.metrics
        lines = []

        def metric(name, kind, help_, values):
            lines.extend([f"# HELP {name} {help_}", f"# TYPE {name} {kind}", *values])

        with self._lock:
            http = sorted(self.http.items())
        metric("starcoder_jax_http_requests_total", "counter", "HTTP requests answered, by endpoint and status.",
               [f'starcoder_jax_http_requests_total{{endpoint="{k[0]}",code="{k[1]}"}} {v}' for k, v in http])
        with m.lock:
            metric("starcoder_jax_requests_total", "counter", "Generation requests finished, by reason.",
                   [f'starcoder_jax_requests_total{{reason="{k}"}} {v}' for k, v in sorted(m.requests.items())])
            metric("starcoder_jax_prompt_tokens_total", "counter", "Prompt tokens of admitted requests.",
                   [f"starcoder_jax_prompt_tokens_total {m.prompt_tokens}"])
            metric("starcoder_jax_prompt_tokens_cached_total", "counter",
                   "Prompt tokens whose KV cache a slot already held (prefix reuse).",
                   [f"starcoder_jax_prompt_tokens_cached_total {m.cached_tokens}"])
            metric("starcoder_jax_generation_tokens_total", "counter", "Tokens generated.",
                   [f"starcoder_jax_generation_tokens_total {m.generated_tokens}"])
            metric("starcoder_jax_time_to_first_token_seconds", "histogram",
                   "From a request's arrival in the queue to its first token.",
                   m.ttft.lines("starcoder_jax_time_to_first_token_seconds"))
            metric("starcoder_jax_time_per_output_token_seconds", "histogram",
                   "Between consecutive tokens of a request.",
                   m.per_token.lines("starcoder_jax_time_per_output_token_seconds"))
        metric("starcoder_jax_queue_depth", "gauge", "Requests waiting for a slot.",
               [f"starcoder_jax_queue_depth {e.queue_depth()}"])
        metric("starcoder_jax_slots_busy", "gauge", "Slots running a request.",
               [f"starcoder_jax_slots_busy {e.busy_slots()}"])
        metric("starcoder_jax_slots", "gauge", "Slots of the KV cache.", [f"starcoder_jax_slots {e.slots}"])
        return "\n".join(lines) + "\n"


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def handle_error(self, request, client_address):
        import sys
        if isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            return  # a client that went away: nothing to report
        super().handle_error(request, client_address)


class _Disconnected(Exception):
    pass


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "starcoder-jax"
    server: _HTTPServer

    @property
    def app(self) -> Server:
        return self.server.app

    def setup(self):
        super().setup()
        # a token is one small write: without this, Nagle's algorithm holds it until the
        # client's delayed ACK of the previous one (tens of ms a token)
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, format, *args):  # noqa: A002 (the base class's name)
        if self.app.verbose:
            super().log_message(format, *args)

    # ------------------------------------------------------------------ routing

    def do_GET(self):
        path = self.path.split("?", 1)[0]
        if path == "/health":
            if self.app.draining:
                return self._json(503, {"status": "draining"}, "/health")
            return self._json(200, {"status": "ok", "slots_idle": self.app.engine.slots - self.app.engine.busy_slots()},
                              "/health")
        if path == "/v1/models":
            return self._json(200, {"object": "list", "data": [{
                "id": self.app.model_name, "object": "model", "created": self.app.created,
                "owned_by": "starcoder-jax", "max_model_len": self.app.engine.max_seq_len}]}, "/v1/models")
        if path == "/metrics":
            body = self.app.metrics_text().encode()
            self.app.count("/metrics", 200)
            return self._send(200, body, "text/plain; version=0.0.4; charset=utf-8")
        return self._error(api.ApiError(404, f"no such endpoint: GET {path}", kind="not_found_error"), path)

    def do_POST(self):
        self._started = False  # whether a response's headers went out
        path = self.path.split("?", 1)[0]
        routes = {"/v1/completions": self._completions, "/infill": self._infill}
        if path not in routes:
            self._discard_body()
            return self._error(api.ApiError(404, f"no such endpoint: POST {path}", kind="not_found_error"), path)
        try:
            body = self._read_json()
            if self.app.draining:
                raise api.ApiError(503, "the server is shutting down", kind="server_error")
            routes[path](body, path)
        except api.ApiError as err:
            if self._started:  # mid-stream (a failed generation): the status went out already
                self.close_connection = True
                self.app.count(path, err.status)
            else:
                self._error(err, path)
        except _Disconnected:
            self.close_connection = True
            self.app.count(path, 499)
        except Exception as err:  # a bug, not the client's: say so, keep serving
            self.close_connection = True
            if not self._started:
                self._error(api.ApiError(500, f"internal error: {type(err).__name__}: {err}", kind="server_error"),
                            path)
            raise

    # ------------------------------------------------------------------ bodies

    def _discard_body(self):
        length = self.headers.get("Content-Length")
        if length and length.isdigit() and int(length) <= self.app.max_body:
            self.rfile.read(int(length))
        else:
            self.close_connection = True

    def _read_json(self) -> dict:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            self.close_connection = True
            raise api.ApiError(411, "send the body with a Content-Length, not chunked")
        length = self.headers.get("Content-Length")
        if length is None or not length.strip().isdigit():
            self.close_connection = True
            raise api.ApiError(411, "a Content-Length header is required")
        n = int(length)
        if n > self.app.max_body:
            self.close_connection = True  # the unread body must not be taken for the next request
            raise api.ApiError(413, f"the request body has {n} bytes; this server takes at most {self.app.max_body}")
        raw = self.rfile.read(n)
        try:
            body = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise api.ApiError(400, f"the body is not valid JSON: {err}") from None
        if not isinstance(body, dict):
            raise api.ApiError(400, "the body must be a JSON object")
        return body

    def _send(self, status: int, body: bytes, content_type: str, headers: dict | None = None):
        self._started = True
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: int, body: dict, endpoint: str, headers: dict | None = None):
        self.app.count(endpoint, status)
        self._send(status, json.dumps(body).encode(), "application/json", headers)

    def _error(self, err: api.ApiError, endpoint: str):
        self._json(err.status, err.body(), endpoint, err.headers)

    # ------------------------------------------------------------------ engine

    def _submit(self, requests: list[Request]):
        submitted = []
        try:
            for r in requests:
                submitted.append(self.app.engine.submit(r))
        except QueueFull as err:
            for r in submitted:
                r.cancel()
            raise api.ApiError(429, f"the server is busy ({err}); retry shortly", kind="rate_limit_error",
                               headers={"Retry-After": "1"}) from None
        except Closed as err:
            for r in submitted:
                r.cancel()
            raise api.ApiError(503, str(err), kind="server_error") from None
        except ValueError as err:
            for r in submitted:
                r.cancel()
            raise api.ApiError(400, str(err), param="max_tokens" if "max_tokens" in str(err) else None) from None

    def _client_gone(self) -> bool:
        """Whether the client closed its connection (its socket reads as end of file)."""
        sock = self.connection
        try:
            readable, _, _ = select.select([sock], [], [], 0)
            if not readable:
                return False
            return sock.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True

    def _events(self, requests: list[Request], events: queue.Queue, *, watch: bool):
        """Yields (request, event) until every request finished; cancels them all when the
        client goes (watch: check its socket while waiting)."""
        by_index = {r.index: r for r in requests}
        open_ = set(by_index)
        checked = time.monotonic()
        try:
            while open_:
                if watch and time.monotonic() - checked >= POLL:
                    checked = time.monotonic()
                    if self._client_gone():
                        raise _Disconnected()
                try:
                    event = events.get(timeout=POLL)
                except queue.Empty:
                    continue
                request = by_index[event.index]
                if event.finished:
                    open_.discard(event.index)
                    if event.error is not None:
                        raise api.ApiError(500, f"generation failed: {event.error}", kind="server_error")
                yield request, event
        except BaseException:
            for r in requests:
                r.cancel()
            raise

    def _start_stream(self):
        self._started = True
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()

    def _chunk(self, data: bytes):
        try:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError, OSError):
            raise _Disconnected() from None

    def _sse(self, obj):
        self._chunk(b"data: " + (obj if isinstance(obj, bytes) else json.dumps(obj).encode()) + b"\n\n")

    def _end_stream(self):
        self._chunk(b"")  # the zero-length chunk ends the body

    # ------------------------------------------------------------------ /v1/completions

    def _completions(self, body: dict, path: str):
        app = self.app
        c = api.parse_completion(body, app.tokenizer, model_name=app.model_name, fim_mode=app.fim_mode)
        events: queue.Queue = queue.Queue()
        for r in c.requests:
            r.events = events
        self._submit(c.requests)
        if not c.stream:
            texts = {r.index: [] for r in c.requests}
            got = {r.index: [] for r in c.requests}
            for request, event in self._events(c.requests, events, watch=True):
                texts[request.index].append(event.text)
                got[request.index].append(event)
            results = [("".join(texts[r.index]), got[r.index]) for r in c.requests]
            return self._json(200, api.completion_body(c, results, model_name=app.model_name,
                                                       tokenizer=app.tokenizer), path)
        self._start_stream()
        app.count(path, 200)
        completion_tokens = 0
        for request, event in self._events(c.requests, events, watch=False):
            if event.finished:
                completion_tokens += event.completion_tokens
            if event.text or event.ids or event.finished:
                self._sse(api.completion_chunk(c, request, event, model_name=app.model_name,
                                               tokenizer=app.tokenizer))
        if c.include_usage:
            self._sse(api.usage_chunk(c, completion_tokens, model_name=app.model_name))
        self._sse(b"[DONE]")
        self._end_stream()

    # ------------------------------------------------------------------ /infill

    def _infill(self, body: dict, path: str):
        app = self.app
        infill = api.parse_infill(body, app.tokenizer, max_seq_len=app.engine.max_seq_len, fim_mode=app.fim_mode)
        request = infill.request
        request.events = queue.Queue()
        start = time.perf_counter()
        self._submit([request])
        elapsed: dict[str, float] = {}
        if infill.stream:
            self._start_stream()
            app.count(path, 200)
        pieces, got = [], []
        for _, event in self._events([request], request.events, watch=not infill.stream):
            now = time.perf_counter()
            if not got:
                elapsed["first"] = now - start
            elapsed["rest"] = now - start - elapsed["first"]
            pieces.append(event.text)
            got.append(event)
            if infill.stream and not event.finished and (event.text or event.ids):
                self._sse(api.infill_chunk(infill, event, tokenizer=app.tokenizer))
        final = api.infill_body(infill, "".join(pieces), got, model_name=app.model_name, tokenizer=app.tokenizer,
                                elapsed=elapsed, stop_word=got[-1].stop_string)
        if not infill.stream:
            return self._json(200, final, path)
        final["content"] = got[-1].text  # the last piece; earlier ones went in their chunks
        self._sse(final)
        self._end_stream()

