"""The drawing page's back end: MNIST-style preprocessing and the ``/predict`` endpoint."""

from __future__ import annotations

import contextlib
import http.client
import json
import re
import select
import socket
import struct
import threading
import time
import types
import urllib.error
import urllib.request

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

import xpnet
import xpnet.cli
from xpnet.draw.preprocess import preprocess, resize_area
from xpnet.draw.server import QUICK_FIT, QUICK_LAYERS, DrawServer, cli_draw, quick_model

# -- helpers -------------------------------------------------------------------------------------


def as_drawing(img28, corner, size=280):
    """A 28x28 MNIST digit as the page would send it: upscaled 10x to 280x280 and moved so its
    ink sits 3 px from one corner (0: top-left, 1: top-right, 2: bottom-left, 3: bottom-right)."""
    big = np.kron(img28.astype(np.float64), np.ones((size // 28, size // 28)))
    rows = np.flatnonzero((big > 0).any(axis=1))
    cols = np.flatnonzero((big > 0).any(axis=0))
    dy = 3 - rows[0] if corner in (0, 1) else size - 4 - rows[-1]
    dx = 3 - cols[0] if corner in (0, 2) else size - 4 - cols[-1]
    moved = np.roll(big, (dy, dx), axis=(0, 1))
    assert moved.sum() == big.sum()  # nothing wrapped around
    return moved


def centre_of_mass(img):
    mass = img.sum()
    return (img.sum(axis=1) @ np.arange(img.shape[0]) / mass, img.sum(axis=0) @ np.arange(img.shape[1]) / mass)


def ink_box(img):
    rows = np.flatnonzero((img > 0).any(axis=1))
    cols = np.flatnonzero((img > 0).any(axis=0))
    return rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1


class Sevens:
    """A stand-in model that always answers 7 and records what it was given."""

    def __init__(self):
        self.calls = []

    def predict_proba(self, X):
        self.calls.append(np.array(X))
        p = np.full((len(X), 10), 0.02)
        p[:, 7] = 0.82
        return p


@contextlib.contextmanager
def serving(model, **kwargs):
    """A DrawServer on a free localhost port, serving from a thread; on the way out, every
    connection has been handled (so whatever the server prints has been printed)."""
    srv = DrawServer(model, port=0, **kwargs)
    model.calls.clear()  # check_servable's trial call
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()
        thread.join(timeout=5)
        # server_close does not join daemon handler threads: wait for each to give back its slot.
        assert all(srv.slots.acquire(timeout=10) for _ in range(srv.max_connections))


@pytest.fixture
def server():
    """A server on a free localhost port with a stand-in model; yields (server, model)."""
    model = Sevens()
    with serving(model) as srv:
        yield srv, model


def post(url, body: bytes, headers=None):
    request = urllib.request.Request(url + "predict", data=body, method="POST", headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def post_image(url, image):
    return post(url, json.dumps({"image": np.asarray(image).tolist()}).encode(), {"Content-Type": "application/json"})


def stroke_image(shape=(280, 280)):
    img = np.zeros(shape)
    h, w = shape
    img[h // 5 : h - h // 5, w * 3 // 7 : w * 4 // 7] = 255.0  # a thick "1"
    return img


# -- preprocessing -------------------------------------------------------------------------------


def test_preprocess_reproduces_real_mnist_digits(mnist):
    """MNIST digits are already in MNIST form: preprocessing them, or their 280x280 shifted
    drawings, gives them back (measured: mean |difference| 0.02 grey levels out of 255)."""
    _, _, X_test, _ = mnist
    for i in range(200):
        original = X_test[i].astype(np.float64)
        assert np.abs(preprocess(original) - original).mean() < 1.0, i
        assert np.abs(preprocess(as_drawing(X_test[i], i % 4)) - original).mean() < 1.0, i


@pytest.mark.parametrize("shape, box", [((100, 50), (20, 10)), ((30, 90), (7, 20)), ((7, 7), (20, 20))])
def test_preprocess_fits_20x20_keeping_aspect_ratio_and_centres_mass(shape, box):
    img = np.zeros((300, 300))
    img[40 : 40 + shape[0], 210 : 210 + shape[1]] = 200.0
    out = preprocess(img)
    assert out.shape == (28, 28) and out.dtype == np.float64
    assert ink_box(out) == box
    assert out.max() == pytest.approx(255.0) and out.min() >= 0.0
    cy, cx = centre_of_mass(out)
    assert abs(cy - 14) <= 0.5 + 1e-9 and abs(cx - 14) <= 0.5 + 1e-9  # an integer shift, like MNIST


def test_preprocess_ignores_position_and_scale():
    rng = np.random.default_rng(5)
    digit = np.zeros((40, 30))
    digit[5:35, 12:18] = rng.uniform(100, 255, size=(30, 6))
    digit[5:10, 4:26] = rng.uniform(100, 255, size=(5, 22))
    placed = np.zeros((200, 200))
    placed[10:50, 150:180] = digit
    elsewhere = np.zeros((200, 200))
    elsewhere[130:170, 20:50] = digit
    np.testing.assert_allclose(preprocess(placed), preprocess(elsewhere), atol=1e-9)
    twice = np.zeros((200, 200))
    twice[30:110, 40:100] = np.kron(digit, np.ones((2, 2)))
    np.testing.assert_allclose(preprocess(twice), preprocess(placed), atol=1e-9)


def test_preprocess_keeps_ink_inside_when_the_mass_is_lopsided():
    img = np.zeros((100, 100))
    img[10:90, 10:14] = 255.0  # a long bar on the left...
    img[10:14, 10:90] = 1.0  # ...and a faint roof: the centre of mass sits near the left edge
    out = preprocess(img)
    digit = resize_area(img[10:90, 10:90], (20, 20))
    assert centre_of_mass(digit)[1] < 2  # centring it on column 14 would push ink off the field
    assert ink_box(out) == (20, 20)
    assert out.sum() == pytest.approx(digit.sum() * 255.0 / digit.max())  # no ink lost


def test_preprocess_of_a_blank_drawing_is_blank():
    assert not preprocess(np.zeros((28, 28))).any()


@pytest.mark.parametrize(
    "image, message",
    [
        (np.zeros((27, 28)), "between 28x28 and 512x512"),
        (np.zeros((28, 513)), "between 28x28 and 512x512"),
        (np.zeros((28, 28, 1)), "2-D"),
        (np.full((28, 28), 255.5), r"\[0, 255\]"),
        (np.full((28, 28), -1.0), r"\[0, 255\]"),
        (np.full((28, 28), 1e308), r"\[0, 255\]"),
        (np.full((28, 28), -1e308), r"\[0, 255\]"),
        (np.full((28, 28), -5e-324), r"\[0, 255\]"),
        (np.full((28, 28), np.inf), "finite"),
        (np.full((28, 28), np.nan), "finite"),
        (np.full((28, 28), "1"), "numbers"),
        ([[1, 2], [3]], "rectangular"),
    ],
)
def test_preprocess_names_what_is_wrong_with_bad_input(image, message):
    with pytest.raises(ValueError, match=message):
        preprocess(image)


def test_preprocess_refuses_a_threshold_outside_the_grey_levels():
    for threshold in (-1.0, 256.0, float("nan")):
        with pytest.raises(ValueError, match=r"threshold must lie in \[0, 255\]"):
            preprocess(stroke_image(), threshold=threshold)


@pytest.mark.parametrize("level", [5e-324, 1e-310, 2.2250738585072014e-308, 1e-300, 1e-3])
def test_preprocess_reads_faint_ink_like_bright_ink(level):
    """The digit is scaled to its brightest pixel, so ink of any level gives the same digit, down to
    the smallest subnormal (scaled after resizing, such ink once overflowed to NaN)."""
    bright = stroke_image((60, 60))
    np.testing.assert_array_equal(preprocess(bright / 255.0 * level), preprocess(bright))


GREY_LEVELS = st.one_of(st.floats(0, 255), st.sampled_from([0.0, 5e-324, 1e-310, 2.2250738585072014e-308, 255.0]))


@settings(max_examples=150, deadline=None)
@given(arrays(np.float64, st.tuples(st.integers(28, 40), st.integers(28, 40)), elements=GREY_LEVELS))
def test_preprocess_of_any_grey_levels_is_a_digit(image):
    """Fuzzed over [0, 255], subnormals included: a finite 28x28 digit, its brightest pixel at
    exactly 255 (or blank), never an error."""
    out = preprocess(image)
    assert out.shape == (28, 28) and np.isfinite(out).all() and out.min() >= 0.0
    assert out.max() == (255.0 if (image > 0).any() else 0.0)


def test_resize_area_averages_blocks_and_repeats_pixels():
    rng = np.random.default_rng(0)
    img = rng.uniform(0, 255, size=(12, 18))
    down = resize_area(img, (3, 6))
    np.testing.assert_allclose(down, img.reshape(3, 4, 6, 3).mean(axis=(1, 3)), rtol=1e-12)
    np.testing.assert_allclose(resize_area(img, (36, 54)), np.kron(img, np.ones((3, 3))), rtol=1e-12)


def test_resize_area_keeps_the_mean_at_any_ratio():
    rng = np.random.default_rng(1)
    img = rng.uniform(0, 255, size=(37, 23))
    for shape in [(20, 13), (5, 29), (1, 1), (41, 7)]:
        assert resize_area(img, shape).mean() == pytest.approx(img.mean(), rel=1e-12)


# -- the endpoint with the real model --------------------------------------------------------------


def test_predict_reads_real_mnist_test_digits_drawn_large_and_off_centre(drawing_model, mnist):
    """300 real test digits (never trained on), upscaled to 280x280 and pushed into a corner."""
    _, _, X_test, y_test = mnist
    srv = DrawServer(drawing_model, port=0)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    try:
        answers = [post_image(srv.url, as_drawing(X_test[i], i % 4)) for i in range(300)]
    finally:
        srv.shutdown()
        srv.server_close()
    assert all(status == 200 for status, _ in answers)
    digits = np.array([a["digit"] for _, a in answers])
    probabilities = np.array([a["probabilities"] for _, a in answers])
    assert probabilities.shape == (300, 10)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(digits, probabilities.argmax(axis=1))
    accuracy = (digits == y_test[:300]).mean()
    assert accuracy >= 0.95, f"{accuracy:.1%} of 300 drawn digits read correctly"


def test_quick_model_is_trained_then_reused_from_its_cache(tmp_path, monkeypatch):
    """No cached file: quick_model trains (here a small net, 1 epoch, on 300 made-up digits),
    saves it, and a second call loads that same model instead of training again."""
    import xpnet.datasets
    import xpnet.draw.server as server_module

    rng = np.random.default_rng(0)
    X = rng.integers(0, 256, size=(300, 28, 28), dtype=np.uint8)
    y = rng.integers(0, 10, size=300)
    loads = []

    def fake_load_mnist(split, root=None):
        loads.append(split)
        return X, y

    monkeypatch.setattr(xpnet.datasets, "load_mnist", fake_load_mnist)
    monkeypatch.setattr(server_module, "QUICK_LAYERS", [784, 16, 10])
    monkeypatch.setattr(server_module, "QUICK_FIT", {**QUICK_FIT, "epochs": 1})
    path = tmp_path / "cache" / "quick.safetensors"
    said = []
    trained = quick_model(path, log=said.append)
    assert "training" in said[0] and str(path) in said[0] and "test accuracy" in said[1]
    assert loads == ["train", "test"] and path.is_file()
    assert trained.config["layers"] == [784, 16, 10]
    untrained = xpnet.MLP([784, 16, 10], seed=0).get_weights()
    assert not np.array_equal(trained.get_weights()[0][0], untrained[0][0])  # it did train

    said.clear()
    reused = quick_model(path, log=said.append)
    assert len(said) == 1 and "cached" in said[0] and str(path) in said[0]
    assert loads == ["train", "test"]  # no second training
    for (W1, b1), (W2, b2) in zip(trained.get_weights(), reused.get_weights()):
        np.testing.assert_array_equal(W1, W2)
        np.testing.assert_array_equal(b1, b2)
    assert QUICK_LAYERS == [784, 256, 128, 10] and QUICK_FIT["optimizer"] == "adam"


# -- the endpoint's contract, with a stand-in model ------------------------------------------------


def test_predict_sends_the_model_an_mnist_style_uint8_digit(server):
    srv, model = server
    status, answer = post_image(srv.url, stroke_image())
    assert status == 200
    assert answer == {"digit": 7, "probabilities": pytest.approx([0.02] * 7 + [0.82] + [0.02] * 2)}
    (X,) = model.calls
    assert X.shape == (1, 28, 28) and X.dtype == np.uint8
    np.testing.assert_array_equal(X[0], np.rint(preprocess(stroke_image())).astype(np.uint8))


@pytest.mark.parametrize("shape", [(28, 28), (512, 512), (28, 512), (300, 41)])
def test_predict_accepts_every_size_in_range(server, shape):
    srv, _ = server
    img = np.zeros(shape)
    img[3 : shape[0] - 3, shape[1] // 2 - 2 : shape[1] // 2 + 2] = 255
    assert post_image(srv.url, img)[0] == 200


@pytest.mark.parametrize(
    "body, message",
    [
        (b"{not json", "not valid JSON"),
        (b"\xff\xfe", "not valid JSON"),
        (b"[1, 2, 3]", "JSON object"),
        (b'{"picture": [[0]]}', "JSON object"),
        (b'{"image": "abc"}', "list of rows"),
        (b'{"image": [1, 2, 3]}', "list of rows"),
        (b'{"image": [[NaN]]}', "finite"),
        (b'{"image": [[Infinity]]}', "finite"),
        (b"[" * 100_000, "nested too deeply"),
        (json.dumps({"image": np.zeros((27, 28)).tolist()}).encode(), "got 27x28"),
        (json.dumps({"image": np.zeros((28, 600)).tolist()}).encode(), "got 28x600"),
        (json.dumps({"image": np.zeros((28, 28, 2)).tolist()}).encode(), "numbers|2-D"),
        (json.dumps({"image": [[0] * 28] * 27 + [[0] * 27]}).encode(), "same length"),
        (json.dumps({"image": [[True] * 28] * 28}).encode(), "not true/false"),
        (json.dumps({"image": [["1"] * 28] * 28}).encode(), "numbers"),
        (json.dumps({"image": [[None] * 28] * 28}).encode(), "numbers"),
        (json.dumps({"image": [[300] * 28] * 28}).encode(), r"\[0, 255\]"),
        (json.dumps({"image": [[-3] * 28] * 28}).encode(), r"\[0, 255\]"),
        (json.dumps({"image": [[10**400] * 28] * 28}).encode(), "numbers"),
        (json.dumps({"image": [[0] * 28] * 28}).encode(), "empty"),
    ],
)
def test_predict_answers_400_with_a_message_on_bad_input(server, body, message):
    srv, model = server
    status, answer = post(srv.url, body)
    assert status == 400
    assert answer["error"]
    assert re.search(message, answer["error"]), answer["error"]
    assert model.calls == []


def test_predict_refuses_an_oversized_body(server):
    srv, model = server
    srv.max_body_bytes = 50_000
    status, answer = post(srv.url, b" " * 50_001)
    assert status == 400 and "limit is 50000" in answer["error"]
    assert model.calls == []
    # The server still works afterwards.
    assert post_image(srv.url, stroke_image((28, 28)))[0] == 200


def test_predict_refuses_a_post_without_content_length(server):
    srv, _ = server
    conn = http.client.HTTPConnection(*srv.server_address[:2], timeout=10)
    conn.putrequest("POST", "/predict")
    conn.putheader("Transfer-Encoding", "chunked")
    conn.endheaders()
    conn.send(b"5\r\nhello\r\n0\r\n\r\n")
    response = conn.getresponse()
    assert response.status == 400 and "Content-Length" in json.loads(response.read())["error"]
    conn.close()


def test_routes(server):
    srv, _ = server
    with urllib.request.urlopen(srv.url + "health", timeout=10) as response:
        assert response.status == 200 and json.loads(response.read()) == {"status": "ok"}
    with urllib.request.urlopen(srv.url, timeout=10) as response:
        page = response.read().decode()
        assert response.status == 200 and response.headers["Content-Type"].startswith("text/html")
    assert "<canvas" in page and 'fetch("predict"' in page
    for path, code in [("nothing", 404), ("predict", 405)]:
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(srv.url + path, timeout=10)
        assert e.value.code == code
    assert post(srv.url.rstrip("/") + "/elsewhere/", b"{}")[0] == 404


def test_serves_requests_side_by_side(server):
    srv, model = server
    results = []
    threads = [threading.Thread(target=lambda: results.append(post_image(srv.url, stroke_image()))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert [status for status, _ in results] == [200] * 8
    assert len(model.calls) == 8


def test_listens_on_localhost_only_by_default():
    srv = DrawServer(Sevens(), port=0)
    try:
        assert srv.server_address[0] == "127.0.0.1"
        assert srv.url.startswith("http://127.0.0.1:")
    finally:
        srv.server_close()


def test_cli_draw_reports_a_port_it_cannot_use(server, tmp_path, capsys, drawing_model):
    srv, _ = server
    path = tmp_path / "m.safetensors"
    drawing_model.save(path)
    args = types.SimpleNamespace(model=str(path), host="127.0.0.1", port=srv.server_address[1], allow_host=[],
                                 no_browser=True)
    assert cli_draw(args) == 1
    assert "cannot listen on 127.0.0.1" in capsys.readouterr().err


# -- every refusal is JSON, and nothing drops the connection ----------------------------------------


def call(srv, method, path, body=None, headers=None):
    """(status, headers, JSON answer) of one request; a ``Host`` in ``headers`` replaces the usual one."""
    conn = http.client.HTTPConnection(*srv.server_address[:2], timeout=30)
    try:
        conn.request(method, path, body, headers or {})
        response = conn.getresponse()
        return response.status, response.headers, json.loads(response.read())
    finally:
        conn.close()


def raw_call(srv, data: bytes):
    """(status, headers, JSON answer) for bytes sent as they are."""
    with socket.create_connection(srv.server_address[:2], timeout=30) as sock:
        sock.sendall(data)
        response = http.client.HTTPResponse(sock)
        response.begin()
        return response.status, response.headers, json.loads(response.read())


def host_header(srv) -> bytes:
    """The Host header a client of ``srv`` sends."""
    return b"127.0.0.1:%d" % srv.server_address[1]


def image_body(shape=(28, 28)) -> bytes:
    return json.dumps({"image": stroke_image(shape).tolist()}).encode()


@pytest.mark.parametrize("method", ["PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "BREW"])
def test_a_method_with_no_answer_gets_json_501(server, method):
    srv, model = server
    status, headers, answer = call(srv, method, "/predict", image_body())
    assert status == 501 and headers["Content-Type"] == "application/json" and headers["Allow"] == "GET, POST"
    assert answer["error"].startswith(f"{method} is not a method this server answers")
    assert model.calls == []


@pytest.mark.parametrize(
    "data, status",
    [
        (b"NONSENSE\r\n", 400),
        (b"GET / HTTP/2.0\r\n", 505),
        (b"GET /" + b"a" * 65_532, 414),  # http.server reads 65537 bytes of request line at most
        (b"GET / HTTP/1.1\r\n" + b"X: y\r\n" * 101, 431),  # it reads 100 headers at most
    ],
)
def test_a_malformed_request_gets_json(server, data, status):
    """http.server's own refusals (each request is sent whole up to where it stops reading: closing
    on unread bytes would reset the connection and lose the answer)."""
    srv, _ = server
    got, headers, answer = raw_call(srv, data)
    assert got == status and headers["Content-Type"] == "application/json" and answer["error"]


@pytest.mark.parametrize("value", [1e308, -1e308, 1.7976931348623157e308, -5e-324, 5e-324, 1e-310, 1e-300])
def test_predict_answers_extreme_but_finite_values(server, value):
    """A stroke of each value: out of [0, 255] is a 400 naming the range; faint positive ink is
    read like bright ink (the smallest subnormals once dropped the connection)."""
    srv, model = server
    status, answer = post(srv.url, json.dumps({"image": (stroke_image() / 255.0 * value).tolist()}).encode())
    if 0 < value <= 255:
        assert status == 200 and answer["digit"] == 7
        np.testing.assert_array_equal(model.calls[0][0], np.rint(preprocess(stroke_image())).astype(np.uint8))
    else:
        assert status == 400 and "[0, 255]" in answer["error"] and model.calls == []


def test_a_failing_model_gets_a_json_500_and_one_log_line(capfd):
    class Failing(Sevens):
        fail = False

        def predict_proba(self, X):
            if self.fail:
                raise RuntimeError("out of ink")
            return super().predict_proba(X)

    model = Failing()
    with serving(model) as srv:
        model.fail = True
        status, answer = post_image(srv.url, stroke_image())
        model.fail = False
        after = post_image(srv.url, stroke_image())
    err = capfd.readouterr().err
    assert status == 500 and answer == {"error": "the server failed on this request (RuntimeError: out of ink)"}
    assert after[0] == 200  # and it keeps serving
    assert err.count("\n") == 1 and "POST /predict failed: RuntimeError: out of ink" in err


def test_a_client_that_leaves_early_leaves_no_traceback(capfd):
    """A reset in the middle of the body (the server's read fails), then one while the model
    thinks (the server's write fails): neither is the server's fault, so neither is logged."""

    class Slow(Sevens):
        thinking = threading.Event()

        def predict_proba(self, X):
            self.thinking.set()
            time.sleep(0.3)
            return super().predict_proba(X)

    model = Slow()
    body = image_body()
    with serving(model) as srv:
        head = b"POST /predict HTTP/1.1\r\nHost: %s\r\nContent-Length: %d\r\n\r\n" % (host_header(srv), len(body))
        model.thinking.clear()
        reset_when = [lambda: time.sleep(0.1), lambda: model.thinking.wait(10)]
        for sent, wait in zip([head + body[:100], head + body], reset_when):
            sock = socket.create_connection(srv.server_address[:2])
            sock.sendall(sent)
            wait()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()  # with a zero linger: a reset, not a goodbye
    assert len(model.calls) == 1  # the second request reached the model; its answer had no reader
    assert capfd.readouterr().err == ""


def test_a_model_that_cannot_serve_the_page_is_refused_at_start():
    class Fives(Sevens):
        def predict_proba(self, X):
            return super().predict_proba(X)[:, :5]

    class Unsure(Sevens):
        def predict_proba(self, X):
            return np.full((len(X), 10), np.nan)

    class Broken:
        def predict_proba(self, X):
            raise RuntimeError("no weights")

    for model, reason in [
        (xpnet.MLP([100, 10], seed=0), "takes 100 values and gives 10 classes"),
        (Fives(), r"gives shape \(1, 5\);"),
        (Unsure(), r"gives shape \(1, 10\), not all finite;"),
        (Broken(), "cannot read a 28x28 image: RuntimeError: no weights"),
        (object(), "cannot read a 28x28 image: AttributeError"),
    ]:
        with pytest.raises(ValueError, match=reason):
            DrawServer(model, port=0)


def test_cli_draw_refuses_a_model_that_cannot_serve_the_page_in_one_line(tmp_path, capsys):
    from xpnet.cli import main

    path = tmp_path / "fives.safetensors"
    xpnet.MLP([784, 16, 5], seed=0).save(path)
    assert main(["draw", "--model", str(path), "--port", "0", "--no-browser"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith("xpnet draw: error: this model takes 784 values and gives 5 classes")


@pytest.mark.parametrize("port", ["99999", "65536", "-1", "eighty"])
def test_cli_draw_refuses_a_port_out_of_range_in_one_line(capsys, port):
    from xpnet.cli import main

    with pytest.raises(SystemExit) as e:
        main(["draw", "--port", port, "--no-browser"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err
    assert err.splitlines()[-1] == (
        f"xpnet draw: error: argument --port: --port takes 0-65535 (0: any free port), got {port!r}"
    )


# -- who is answered ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "host", ["evil.example:{port}", "127.0.0.1:{other}", "127.0.0.1", "", "127.0.0.1:{port}.evil.example"]
)
def test_a_request_addressed_to_another_host_is_refused(server, host):
    """DNS rebinding: a page at evil.example whose name now points at 127.0.0.1 sends Host evil.example."""
    srv, model = server
    port = srv.server_address[1]
    host = host.format(port=port, other=port + 1)
    for method, path, body in [("GET", "/", None), ("POST", "/predict", image_body())]:
        status, _, answer = call(srv, method, path, body, {"Host": host})
        assert status == 421 and f"not to Host {host!r}" in answer["error"]
        assert f"localhost:{port}" in answer["error"]
    assert raw_call(srv, b"GET / HTTP/1.1\r\n\r\n")[0] == 421  # no Host at all
    assert model.calls == []


def test_requests_addressed_to_this_server_are_answered():
    with serving(Sevens(), allowed_hosts=["Drawing.LAN", "[fe80::1]"]) as srv:
        port = srv.server_address[1]
        for name in ["127.0.0.1", "localhost", "LocalHost", "[::1]", "drawing.lan", "[fe80::1]"]:
            assert call(srv, "GET", "/health", headers={"Host": f"{name}:{port}"})[0] == 200, name


def test_allowed_hosts_are_names_without_a_port():
    for name in ["drawing.lan:8000", "http://drawing.lan", "", "fe80::zz"]:
        with pytest.raises(ValueError, match=f"without a port, got {re.escape(repr(name))}"):
            DrawServer(Sevens(), port=0, allowed_hosts=[name])
    args = xpnet.cli._parser().parse_args(["draw", "--allow-host", "a", "--allow-host", "b"])
    assert args.allow_host == ["a", "b"]


@pytest.mark.parametrize(
    "origin, status",
    [
        ("http://evil.example", 403),
        ("null", 403),  # a sandboxed frame or a file:// page
        ("http://127.0.0.1:{other}", 403),
        ("https://127.0.0.1:{port}", 403),
        ("http://127.0.0.1:{port}", 200),  # what a browser on the page sends
        ("http://localhost:{port}", 200),
    ],
)
def test_a_post_from_another_origin_is_refused(server, origin, status):
    """A text/plain POST is a "simple" request a browser sends cross-site without asking first."""
    srv, model = server
    port = srv.server_address[1]
    origin = origin.format(port=port, other=port + 1)
    headers = {"Origin": origin, "Content-Type": "text/plain", "Sec-Fetch-Site": "cross-site"}
    got, _, answer = call(srv, "POST", "/predict", image_body(), headers)
    assert got == status
    if status == 403:
        assert repr(origin) in answer["error"] and model.calls == []


# -- load: a real backlog, a cap on connections, a deadline per request ----------------------------


@pytest.mark.parametrize("max_connections", [4, 32])
def test_32_clients_at_once_all_get_answers(max_connections):
    """All connect at the same moment (http.server's listen queue of 5 reset about a third);
    beyond the cap they wait in the listen queue and are answered in turn."""
    model = Sevens()
    body = image_body()
    start = threading.Barrier(32)
    answers = [None] * 32

    def client(i):
        conn = http.client.HTTPConnection(*srv.server_address[:2], timeout=30)
        start.wait()
        try:
            conn.request("POST", "/predict", body, {"Content-Type": "application/json"})
            response = conn.getresponse()
            answers[i] = (response.status, json.loads(response.read())["digit"])
        except OSError as e:
            answers[i] = repr(e)
        finally:
            conn.close()

    with serving(model, max_connections=max_connections) as srv:
        threads = [threading.Thread(target=client, args=(i,)) for i in range(32)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
    assert answers == [(200, 7)] * 32
    assert len(model.calls) == 32


def test_connections_beyond_the_cap_wait_for_a_free_one():
    with serving(Sevens(), max_connections=2) as srv:
        idle = [socket.create_connection(srv.server_address[:2]) for _ in range(2)]  # hold both
        answers = []
        waiting = threading.Thread(target=lambda: answers.append(call(srv, "GET", "/health")))
        waiting.start()
        waiting.join(timeout=0.5)
        assert answers == []  # queued, not answered, not refused
        idle[0].close()
        waiting.join(timeout=10)
        idle[1].close()
    assert answers[0][0] == 200


def trickle(srv, head: bytes, rest: bytes, pause: float):
    """Send ``head``, then ``rest`` a byte every ``pause`` seconds until the server answers or
    closes; returns (seconds from connecting, bytes received)."""
    began = time.monotonic()
    received = b""
    with socket.create_connection(srv.server_address[:2], timeout=30) as sock:
        sock.sendall(head)
        for byte in rest:
            if select.select([sock], [], [], pause)[0]:
                break
            sock.sendall(bytes([byte]))
        with contextlib.suppress(ConnectionError):
            while chunk := sock.recv(65536):
                received += chunk
    return time.monotonic() - began, received


def test_a_client_trickling_its_headers_is_cut_off_at_the_deadline():
    """One byte every 0.2 s: a timeout per read would wait forever; the deadline is for the whole request."""
    with serving(Sevens(), request_timeout=1.0) as srv:
        headers = b"GET /health HTTP/1.1\r\nHost: %s\r\nX-Slow: %s\r\n\r\n" % (host_header(srv), b"z" * 40)
        seconds, received = trickle(srv, b"", headers, pause=0.2)
    assert 0.9 < seconds < 2.5 and received == b""  # cut off, long before the 10 s it would take


def test_a_client_trickling_its_body_gets_a_json_408_at_the_deadline():
    model = Sevens()
    with serving(model, request_timeout=1.0) as srv:
        head = b"POST /predict HTTP/1.1\r\nHost: %s\r\nContent-Length: 100\r\n\r\n" % host_header(srv)
        # 0.4 s apart: the deadline falls between two bytes, so none is left unread at the close
        seconds, received = trickle(srv, head, b"{" * 100, pause=0.4)
    assert 0.9 < seconds < 2.5 and received.startswith(b"HTTP/1.1 408 ")
    assert json.loads(received.split(b"\r\n\r\n", 1)[1]) == {"error": "the request took longer than 1 s to arrive"}
    assert model.calls == []
