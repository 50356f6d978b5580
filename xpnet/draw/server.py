"""A local web page to draw a digit on, and the ``POST /predict`` endpoint it calls.

Standard library only (``http.server``). Routes:

- ``GET /``: the drawing page (``page.html`` beside this file).
- ``GET /health``: ``{"status": "ok"}``.
- ``POST /predict``: JSON ``{"image": [[...], ...]}``, a grey-level drawing as a list of rows
  (28x28 up to 512x512, values 0-255, ink bright on dark like MNIST). It is preprocessed the way
  MNIST was made (``xpnet.draw.preprocess``) and answered with
  ``{"digit": int, "probabilities": [10 floats]}``.

Every refusal is JSON ``{"error": "..."}`` saying what is wrong: 400 for a bad body (too large,
not JSON, wrong shape, values out of range, an empty drawing), 404 for an unknown page, 405 or 501
for a method there is no answer to, 408 for a body that is too slow to arrive. User input never
causes a 500; should the server itself fail, the answer is a JSON 500 and one line in its log,
never a dropped connection. A client that leaves early is not an error.

Who is answered: the server listens on 127.0.0.1 unless told otherwise, answers only requests
whose ``Host`` names it (127.0.0.1, localhost, [::1], the host it listens on, or one of
``allowed_hosts``, at its port; else 421), so that a web page cannot reach it through a DNS name of
its own (DNS rebinding), and refuses a POST whose ``Origin`` is another site's (403).

Load: at most ``max_connections`` connections are served at once; the next ones wait in a
128-deep listen queue. Each request must arrive whole within ``request_timeout`` seconds of the
connection being ready for it, so a client that trickles bytes cannot keep a connection.
"""

from __future__ import annotations

import io
import ipaddress
import json
import socket
import sys
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path

import numpy as np

from .preprocess import preprocess, validate_image

__all__ = ["DrawServer", "check_servable", "BadRequest", "parse_predict_body", "predict_drawing", "quick_model", "train_quick_model", "cli_draw"]

#: A 512x512 drawing written as JSON ("255, " per pixel) is about 1.3 MB; leave room for spaces.
MAX_BODY_BYTES = 4 * 1024 * 1024
#: An oversized body up to this size is read and dropped before answering; a larger one is not.
DISCARD_LIMIT = 64 * 1024 * 1024

#: The architecture and training of the model ``xpnet draw`` makes when given no ``--model``.
QUICK_LAYERS = [784, 256, 128, 10]
QUICK_FIT = {"epochs": 3, "batch_size": 128, "optimizer": "adam", "lr": 1e-3}


class BadRequest(ValueError):
    """A request the server refuses with 400 and this message."""


def parse_predict_body(body: bytes) -> np.ndarray:
    """The drawing in a ``/predict`` body, as a float64 (H, W) array in [0, 255].

    Raises
    ------
    BadRequest
        The body is not UTF-8 JSON, not an object with an ``"image"`` key, or the image is not a
        2-D array of numbers of an accepted size and range.
    """
    try:
        payload = json.loads(body, parse_constant=_refuse_constant)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BadRequest(f"the body is not valid JSON: {e}") from None
    except RecursionError:
        raise BadRequest("the body is nested too deeply to be an image") from None
    except ValueError as e:  # NaN / Infinity
        raise BadRequest(str(e)) from None
    if not isinstance(payload, dict) or "image" not in payload:
        raise BadRequest('the body must be a JSON object {"image": [[...], ...]}')
    image = payload["image"]
    if not isinstance(image, list) or not all(isinstance(row, list) for row in image):
        raise BadRequest("image must be a list of rows, each a list of numbers")
    if len({len(row) for row in image}) > 1:
        lengths = sorted({len(row) for row in image})
        raise BadRequest(f"image rows must all have the same length, got lengths {lengths[0]} to {lengths[-1]}")
    if any(isinstance(v, bool) for row in image for v in row):
        raise BadRequest("image values must be numbers, not true/false")
    try:
        return validate_image(image)
    except ValueError as e:
        raise BadRequest(str(e)) from None


def _refuse_constant(name):
    raise ValueError(f"image values must be finite numbers, got {name}")


def predict_drawing(model, image) -> dict:
    """The model's guess for one drawing: ``{"digit": int, "probabilities": [10 floats]}``.

    The drawing is preprocessed like MNIST, rounded to uint8 grey levels and given to
    ``model.predict_proba``, which scales uint8 pixels by 1/255 exactly as in training.

    Raises
    ------
    BadRequest
        The drawing has no ink.
    """
    digit = preprocess(image)
    if not digit.any():
        raise BadRequest("the drawing is empty: draw a digit (ink bright on a dark background)")
    pixels = np.rint(digit).astype(np.uint8)[None]  # (1, 28, 28)
    proba = np.asarray(model.predict_proba(pixels), dtype=np.float64)[0]
    return {"digit": int(np.argmax(proba)), "probabilities": [float(p) for p in proba]}


def check_servable(model) -> None:
    """Refuse, at start, a model the page cannot use, with the reason in one line.

    The page needs a model of one 28x28 image (784 values: an MLP's ``(784,)`` rows or a CNN's
    ``(28, 28, 1)`` images) giving 10 class probabilities. Beyond what the model says of itself,
    ``predict_proba`` is tried on a blank ``(1, 28, 28)`` uint8 image exactly as ``/predict`` calls
    it, and must give finite probabilities of shape (1, 10).

    Raises
    ------
    ValueError
        Saying what the model takes or gives instead.
    """
    n_features, n_classes = getattr(model, "n_features", 784), getattr(model, "n_classes", 10)
    if (n_features, n_classes) != (784, 10):
        raise ValueError(
            f"this model takes {n_features} values and gives {n_classes} classes; the drawing page needs a "
            "model of 28x28 digit images (784 values) and 10 classes"
        )
    try:
        proba = np.asarray(model.predict_proba(np.zeros((1, 28, 28), dtype=np.uint8)), dtype=np.float64)
    except Exception as e:
        raise ValueError(f"this model cannot read a 28x28 image: {type(e).__name__}: {e}") from e
    if proba.shape != (1, 10) or not np.isfinite(proba).all():
        got = f"shape {proba.shape}" + ("" if np.isfinite(proba).all() else ", not all finite")
        raise ValueError(f"on a blank 28x28 image this model's predict_proba gives {got}; the drawing page "
                         "needs finite probabilities of shape (1, 10)")


class DrawServer(ThreadingHTTPServer):
    """Serves the drawing page and ``/predict`` for one model.

    Parameters
    ----------
    model : object with ``predict_proba((N, 28, 28) uint8) -> (N, 10)``
        Any xpnet model of 28x28 digits (an MLP, a CNN); calls to it are serialized by a lock.
        ``check_servable`` tries it once before the server starts.
    host : str
        Address to listen on; 127.0.0.1 keeps it to this machine.
    port : int
        0 picks a free port (see ``url``).
    allowed_hosts : iterable of str
        More names or addresses (no port) that requests may be addressed to, besides 127.0.0.1,
        localhost, ::1 and ``host``: for example this machine's name when ``host`` is 0.0.0.0.
    max_body_bytes : int
        Larger ``/predict`` bodies are refused with 400 before being read.
    max_connections : int
        Connections served at once; more wait in the listen queue until one ends.
    request_timeout : float
        Seconds a client has to send a whole request, counted from when the connection is ready
        for it (accepted, or the previous answer sent). An idle connection closes after it too.
    quiet : bool
        Do not log every request to stderr (failures are always logged, one line each).
    """

    daemon_threads = True
    request_queue_size = 128  # the listen backlog: http.server's 5 resets clients in a burst

    def __init__(self, model, host="127.0.0.1", port=8000, *, allowed_hosts=(), max_body_bytes=MAX_BODY_BYTES,
                 max_connections=32, request_timeout=10.0, quiet=True):
        check_servable(model)
        if not (max_connections >= 1 and request_timeout > 0):
            raise ValueError(f"max_connections must be >= 1 and request_timeout > 0, got {max_connections} "
                             f"and {request_timeout}")
        extra = {_host_name(name) for name in allowed_hosts}  # checked before a port is taken
        if ":" in host:
            self.address_family = socket.AF_INET6
        self.model = model
        self.max_body_bytes = int(max_body_bytes)
        self.request_timeout = float(request_timeout)
        self.quiet = quiet
        self.page = resources.files(__package__).joinpath("page.html").read_bytes()
        self.model_lock = threading.Lock()
        self.max_connections = int(max_connections)
        self.slots = threading.BoundedSemaphore(self.max_connections)  # one per connection served
        super().__init__((host, port), _Handler)
        port = self.server_address[1]
        own = ("127.0.0.1", "localhost", "::1", host, self.server_address[0])
        names = extra | {_host_name(name) for name in own if name}
        #: The ``Host`` header values answered, lower case; browsers leave out port 80.
        self.allowed_hosts = frozenset({f"{n}:{port}" for n in names} | (names if port == 80 else set()))
        self.allowed_origins = frozenset(f"http://{value}" for value in self.allowed_hosts)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"

    def predict(self, image) -> dict:
        with self.model_lock:
            return predict_drawing(self.model, image)

    def process_request(self, request, client_address):
        # At the cap, stop accepting: the next clients wait in the listen queue, not in threads.
        self.slots.acquire()
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.slots.release()
            raise

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()

    def handle_error(self, request, client_address):
        """One line for a failure (socketserver prints a traceback); none for a client that left
        or was too slow, which is no fault of the server's."""
        error = sys.exc_info()[1]
        if not isinstance(error, (ConnectionError, TimeoutError)):
            _log(f"{client_address[0]}: {type(error).__name__}: {error}")


def _host_name(name: str) -> str:
    """A host name or address as it appears in a ``Host`` header, lower case, without port."""
    name = name.strip().lower()
    bare = name[1:-1] if name.startswith("[") and name.endswith("]") else name
    if ":" in bare:  # only an IPv6 address may hold a colon; "host:port" is a mistake
        try:
            return f"[{ipaddress.IPv6Address(bare)}]"
        except ValueError:
            raise ValueError(f"an allowed host is a name or address without a port, got {name!r}") from None
    if not bare or any(c in bare for c in "/@ \t"):
        raise ValueError(f"an allowed host is a name or address without a port, got {name!r}")
    return bare


def _log(message: str) -> None:
    print(f"xpnet draw: {message}", file=sys.stderr, flush=True)


class _DeadlineReader(io.RawIOBase):
    """A socket's bytes until a deadline for the whole request. A timeout per ``recv`` restarts
    with every byte, so a client sending one byte a second would hold the connection forever."""

    def __init__(self, sock: socket.socket, timeout: float):
        self.sock, self.timeout = sock, timeout
        self.restart()

    def restart(self) -> None:
        self.deadline = time.monotonic() + self.timeout

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        left = self.deadline - time.monotonic()
        if left > 0:
            self.sock.settimeout(left)
            try:
                return self.sock.recv_into(buffer)
            except TimeoutError:
                pass
            finally:
                self.sock.settimeout(self.timeout)  # what a write may take
        raise TimeoutError(f"the request took longer than {self.timeout:g} s to arrive")


class _Handler(BaseHTTPRequestHandler):
    server: DrawServer
    protocol_version = "HTTP/1.1"  # keep-alive: the page sends a request per stroke
    server_version = "xpnet-draw"
    default_request_version = "HTTP/1.0"  # so an unreadable request line gets a status line, not a bare body
    body_pending = False  # a body the client sent that nothing has read yet
    answered = False  # the answer to the current request has begun

    def setup(self):
        self.timeout = self.server.request_timeout  # socketserver sets it on the socket
        super().setup()
        self.rfile.close()  # replaced by a reader with a deadline (the socket stays open)
        self.reader = _DeadlineReader(self.connection, self.timeout)
        self.rfile = io.BufferedReader(self.reader)

    def handle_one_request(self):
        self.reader.restart()
        self.body_pending = self.answered = False
        super().handle_one_request()

    def parse_request(self):
        """http.server's parsing, then who is asking: the checks every request passes."""
        if not super().parse_request():
            return False
        self.body_pending = True
        host = self.headers.get("Host", "")
        if host.strip().lower() not in self.server.allowed_hosts:
            names = ", ".join(sorted(self.server.allowed_hosts))
            self.send_error(HTTPStatus.MISDIRECTED_REQUEST,
                            f"this server answers requests addressed to {names}, not to Host {host!r}")
            return False
        origin = self.headers.get("Origin")
        if self.command == "POST" and origin is not None and origin.lower() not in self.server.allowed_origins:
            self.send_error(HTTPStatus.FORBIDDEN, f"a POST from the page at {origin!r} is refused: only this "
                            "server's own page may post to it")
            return False
        return True

    def do_GET(self):
        self._answer(self._get)

    def do_POST(self):
        self._answer(self._post)

    def _answer(self, route):
        """The last line of defence: whatever goes wrong, the client gets JSON, the log one line."""
        try:
            route()
        except (ConnectionError, TimeoutError):
            raise  # the client left or stalled: there is no one to answer
        except Exception as e:
            _log(f"{self.command} {self.path} failed: {type(e).__name__}: {e}")
            if not self.answered:
                self.send_error(HTTPStatus.INTERNAL_SERVER_ERROR,
                                f"the server failed on this request ({type(e).__name__}: {e})")
            self.close_connection = True

    def _get(self):
        path = self.path.split("?", 1)[0]
        if path in ("/", "/index.html"):
            self._send(HTTPStatus.OK, self.server.page, "text/html; charset=utf-8")
        elif path == "/health":
            self._send_json(HTTPStatus.OK, {"status": "ok"})
        elif path == "/predict":
            self.send_error(HTTPStatus.METHOD_NOT_ALLOWED, "use POST /predict", Allow="POST")
        else:
            self.send_error(HTTPStatus.NOT_FOUND, f"no such page: {path}")

    def _post(self):
        if self.path.split("?", 1)[0] != "/predict":
            self.send_error(HTTPStatus.NOT_FOUND, f"nothing to POST to at {self.path}")
            return
        try:
            answer = self.server.predict(parse_predict_body(self._read_body()))
        except BadRequest as e:
            self.send_error(HTTPStatus.BAD_REQUEST, str(e))
        except TimeoutError as e:
            self.send_error(HTTPStatus.REQUEST_TIMEOUT, str(e))
        else:
            self._send_json(HTTPStatus.OK, answer)

    def _read_body(self) -> bytes:
        self.body_pending = False  # read here, or the connection closes
        if self.headers.get("Transfer-Encoding", "").lower() not in ("", "identity"):
            raise BadRequest("send the body with a Content-Length, not chunked")
        length = self.headers.get("Content-Length")
        try:
            length = int(length)
            if length < 0:
                raise ValueError
        except (TypeError, ValueError):
            raise BadRequest(f"a POST needs a Content-Length header, got {length!r}") from None
        if length > self.server.max_body_bytes:
            self._discard(length)
            raise BadRequest(
                f"the body is {length} bytes; the limit is {self.server.max_body_bytes} "
                f"(a 512x512 drawing fits)"
            )
        body = self.rfile.read(length)
        if len(body) != length:
            raise BadRequest(f"the body ended after {len(body)} of {length} bytes")
        return body

    def _discard(self, n: int) -> None:
        """Read away up to DISCARD_LIMIT bytes of a body nobody will use: closing the connection
        on unread bytes would reset it before the client reads the answer."""
        n = min(n, DISCARD_LIMIT)
        while n > 0:
            chunk = self.rfile.read(min(n, 1 << 16))
            if not chunk:
                break
            n -= len(chunk)

    def send_error(self, code, message=None, explain=None, **headers):
        """Every refusal as JSON, ours and http.server's own (a malformed request line, a method
        with no ``do_*``, too many headers, ...); the connection then closes."""
        if code == HTTPStatus.NOT_IMPLEMENTED:  # http.server's answer to a method with no do_*
            message = f"{self.command} is not a method this server answers: use GET or POST"
            headers["Allow"] = "GET, POST"
        if self.body_pending:
            self.body_pending = False
            try:
                self._discard(int(self.headers.get("Content-Length", 0)))
            except ValueError:
                pass  # no length to read by: the close may cut the answer short
        self.log_error("code %d, message %s", code, message)
        self.close_connection = True
        self._send_json(code, {"error": message or HTTPStatus(code).phrase}, **headers)

    def _send_json(self, status, obj, **headers):
        self._send(status, json.dumps(obj).encode(), "application/json", **headers)

    def _send(self, status, data: bytes, content_type: str, **headers):
        self.answered = True
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        for name, value in headers.items():
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def log_message(self, format, *args):
        if not self.server.quiet:
            super().log_message(format, *args)


# -- the model to serve ------------------------------------------------------------------------


def quick_model_path() -> Path:
    """Where ``xpnet draw`` caches the model it trains when given no ``--model``."""
    import pooch  # lazy: only the default cache location needs it

    name = "draw-" + "-".join(map(str, QUICK_LAYERS)) + ".safetensors"
    return Path(pooch.os_cache("xpnet")) / name


def train_quick_model(X, y):
    """The model ``xpnet draw`` serves by default: ``QUICK_LAYERS`` trained with ``QUICK_FIT``."""
    from ..model import MLP

    model = MLP(QUICK_LAYERS, seed=0)
    model.fit(X, y, verbose=0, **QUICK_FIT)
    return model


def quick_model(path=None, *, log=print):
    """A model for the drawing page: loaded from ``path`` if there, else trained and saved there.

    Trains ``QUICK_LAYERS`` with ``QUICK_FIT`` on the MNIST training set (about 97.5% test
    accuracy; under a minute on a laptop CPU) and reports what it is doing through ``log``.
    """
    from .. import datasets
    from ..model import load

    path = Path(path) if path is not None else quick_model_path()
    if path.is_file():
        log(f"no --model given: using the model cached at {path}")
        return load(path)
    log(f"no --model given: training a quick {'-'.join(map(str, QUICK_LAYERS))} model on MNIST "
        f"({QUICK_FIT['epochs']} epochs of {QUICK_FIT['optimizer']}), then caching it at {path}")
    model = train_quick_model(*datasets.load_mnist("train"))
    log(f"MNIST test accuracy: {model.score(*datasets.load_mnist('test')):.2%}")
    path.parent.mkdir(parents=True, exist_ok=True)
    model.save(path)
    return model


def cli_draw(args) -> int:
    """``xpnet draw [--model PATH] [--host H] [--port P] [--allow-host NAME] [--no-browser]``: serve until
    Ctrl-C."""
    from ..model import load

    say = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    model = load(args.model) if args.model else quick_model(log=say)
    try:
        server = DrawServer(model, args.host, args.port, allowed_hosts=args.allow_host)
    except OSError as e:
        say(f"xpnet draw: cannot listen on {args.host}:{args.port}: {e.strerror or e}")
        return 1
    if server.server_address[0] not in ("127.0.0.1", "::1"):
        say(f"xpnet draw: listening on {args.host}: other machines can reach this page, by the names "
            f"{', '.join(sorted(server.allowed_hosts))} (more with --allow-host)")
    say(f"xpnet draw: open {server.url} (Ctrl-C to stop)")
    if not getattr(args, "no_browser", False):
        import webbrowser

        threading.Timer(0.3, webbrowser.open, (server.url,)).start()
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        say("xpnet draw: stopped")
    finally:
        server.server_close()
    return 0
