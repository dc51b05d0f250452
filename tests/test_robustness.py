"""Bad and unusual input at the real servers: each bad request gets a 4xx with a clear JSON message and the
server goes on serving; unusual but valid images are answered. Also the UI's limits, CSRF and bind address."""

import base64
import json
import re
import socket
import struct
import zlib

import numpy as np
import pytest
import requests
from conftest import REPO
from PIL import Image

from entrypoints import container, serve
from fmnist_pyfunc import config, contract, transport
from fmnist_pyfunc.contract import png_base64
from fmnist_testkit import harness
from fmnist_testkit.harness import child_env
from fmnist_testkit.images import b64, correlation, exif_rotated_jpeg, image_bytes, records, upscaled
from webui import app as ui

pytestmark = pytest.mark.e2e
LEAKS = ("Traceback", "stack_trace", 'File "')  # what must never reach a client


def _pixels(value) -> bytes:
    return records({"pixels": value})


def _image(raw: bytes) -> bytes:
    return records({"image": b64(raw)})


def _truncated_jpeg() -> bytes:
    whole = image_bytes(upscaled(np.full((28, 28), 128, np.uint8)), "JPEG")
    return whole[: len(whole) // 2]


SVG = b'<svg xmlns="http://www.w3.org/2000/svg" width="28" height="28"><rect width="28" height="28"/></svg>'
ZEROS = np.zeros((28, 28), int).tolist()
BAD_REQUESTS = {  # name: (body, status, words the message must contain)
    "malformed JSON": (b'{"dataframe_records": [', 400, "valid JSON"),
    "empty body": (b"", 400, "valid JSON"),
    "bare list": (json.dumps([{"pixels": ZEROS}]).encode(), 400, "Received a list"),
    "unknown key": (json.dumps({"records": [{"pixels": ZEROS}]}).encode(), 400, "exactly one of the input fields"),
    "two keys": (json.dumps({"dataframe_records": [{"pixels": ZEROS}], "inputs": [ZEROS]}).encode(), 400,
                 "exactly one of the input fields"),
    "only unknown fields": (records({"weights": 1}), 400, "with 'pixels' or 'image'"),
    "27x28": (_pixels(np.zeros((27, 28), int).tolist()), 400, "shape (28, 28), got (27, 28)"),
    "flat 784": (_pixels([0] * 784), 400, "shape (28, 28), got (784,)"),
    "3-D colour": (_pixels(np.zeros((28, 28, 3), int).tolist()), 400, "shape (28, 28), got (28, 28, 3)"),
    "NaN": (b'{"dataframe_records": [{"pixels": [' + b",".join([b"[" + b",".join([b"NaN"] * 28) + b"]"] * 28)
            + b"]}]}", 400, "NaN or infinite"),
    "+inf": (_pixels(np.full((28, 28), np.inf).tolist()), 400, "NaN or infinite"),
    "-inf": (_pixels(np.full((28, 28), -np.inf).tolist()), 400, "NaN or infinite"),
    "negative": (_pixels(np.full((28, 28), -1).tolist()), 400, "0-255 scale"),
    "above 255": (_pixels(np.full((28, 28), 256).tolist()), 400, "0-255 scale"),
    "booleans": (_pixels(np.ones((28, 28), bool).tolist()), 400, "booleans"),
    "empty batch": (records(), 400, "empty batch"),
    "bare arrays of images": (json.dumps({"inputs": [ZEROS, ZEROS]}).encode(), 400,
                              "Send each image as an object, {\"pixels\""),
    "batch above maximum": (records(*[{"pixels": ZEROS}] * (contract.MAX_BATCH_ROWS + 1)), 400,
                            f"maximum of {contract.MAX_BATCH_ROWS}"),
    "strings for numbers": (_pixels([["a"] * 28] * 28), 400, "array of numbers"),
    "a string for pixels": (_pixels("hello"), 400, "28x28 array of numbers"),
    "not base64": (records({"image": "this is not base64!"}), 400, "not valid base64"),
    "not an image": (_image(b"just some bytes, not an image"), 400, "not an image in an accepted format"),
    "TIFF": (_image(image_bytes(Image.new("L", (28, 28)), "TIFF")), 400, "TIFF is not accepted; send PNG, JPEG"),
    "SVG": (_image(SVG), 400, "SVG is not accepted"),
    "PDF": (_image(b"%PDF-1.7\n1 0 obj\n<<>>\nendobj\n"), 400, "PDF is not accepted"),
    "truncated JPEG": (_image(_truncated_jpeg()), 400, "truncated or corrupt"),
    "decompression bomb": (_image(image_bytes(Image.new("1", (20000, 20000)), "PNG")), 400, "exceeds"),
    "body over the limit": (records({"image": "A" * (transport.MAX_BODY_BYTES + 1)}), 413,
                            f"exceeds {transport.MAX_BODY_BYTES:,} bytes"),
    "nested 100,000 deep": (b"[" * 100_000 + b"]" * 100_000, 400, "nested 100000 levels deep"),
    "nested deep inside records": (b'{"dataframe_records": [' + b"[" * 5000 + b"]" * 5000 + b"]}", 400,
                                   "levels deep (at most"),
}
# Every JSON type in every field of MLflow's four input layouts: a 4xx each, never a 500.
JSON_VALUES = {"null": None, "int": 5, "string": "x", "bool": True, "object": {"a": 1}, "ints": [1, 2],
               "nulls": [None], "lists": [[1]], "empty object": {}, "columns": {"columns": 5, "data": 3},
               "pixels as string": [{"pixels": "abc"}], "image as int": [{"image": 5}],
               "image as list": [{"image": [1]}], "pixels as object": [{"pixels": {"a": 1}}]}
ODD_PAYLOADS = {f"{layout}={name}": json.dumps({layout: value}).encode()
                for layout in ("dataframe_records", "dataframe_split", "inputs", "instances")
                for name, value in JSON_VALUES.items()}
ODD_PAYLOADS |= {"top-level string": b'"x"', "top-level null": b"null", "top-level number": b"1",
                 "latin-1 bytes": '{"dataframe_records": [{"image": "\xe9"}]}'.encode("latin-1"),
                 "params not an object": json.dumps({"dataframe_records": [{"pixels": ZEROS}], "params": 5}).encode()}


@pytest.mark.parametrize("name", ODD_PAYLOADS)
def test_no_json_value_in_any_field_is_a_server_error(scoring_url, name):
    """Whatever JSON type sits in whatever field of any layout MLflow's protocol allows, the answer is a 4xx
    {error_code, message} or a 200 (MLflow ignores what it does not use), never a 5xx or a trace."""
    response = _post(scoring_url, ODD_PAYLOADS[name])
    assert response.status_code < 500, response.text[:300]
    if response.status_code != 200:
        assert set(response.json()) == {"error_code", "message"} and not any(x in response.text for x in LEAKS)


def test_invocations_without_content_type_is_415_saying_what_to_send(scoring_url, dataset):
    """A body with no Content-Type header (MLflow's app: 500) gets 415 naming the header to send."""
    response = requests.post(f"{scoring_url}/invocations", data=_pixels(dataset.test_images[0].tolist()), timeout=30)
    assert "Content-Type" not in response.request.headers
    assert response.status_code == 415 and "application/json" in response.json()["message"]


def _post(url: str, body: bytes) -> requests.Response:
    return requests.post(f"{url}/invocations", data=body, headers={"Content-Type": "application/json"}, timeout=120)


@pytest.mark.parametrize("name", BAD_REQUESTS)
def test_invocations_refuses_bad_input_clearly_and_keeps_serving(scoring_url, dataset, name):
    """Each bad /invocations request gets its 4xx as {error_code, message} naming the problem, without traces or
    echoed input, and the next good request is answered."""
    body, status, words = BAD_REQUESTS[name]
    response = _post(scoring_url, body)
    assert response.status_code == status, response.text[:300]
    error = response.json()
    assert set(error) == {"error_code", "message"} and words in error["message"], error
    assert len(error["message"]) <= 600 and not any(leak in response.text for leak in LEAKS)
    assert _post(scoring_url, _pixels(dataset.test_images[0].tolist())).status_code == 200


def _cmyk_jpeg(pixels: np.ndarray) -> bytes:
    return image_bytes(upscaled(255 - pixels).convert("CMYK"), "JPEG", quality=95)


def _photo_png(pixels: np.ndarray) -> bytes:
    """The garment in the dataset's tones, photo-sized, as a plain PNG."""
    return image_bytes(upscaled(pixels), "PNG")


def _dark_on_white_png(pixels: np.ndarray) -> bytes:
    """The garment as most photos show one, dark on white, photo-sized, as a plain PNG."""
    return image_bytes(upscaled(255 - pixels), "PNG")


def _dataset_png(pixels: np.ndarray) -> bytes:
    return base64.b64decode(png_base64(pixels))


UNUSUAL = {  # name: (the test image as people might send it, the same picture as an ordinary PNG)
    "RGBA cut-out": (lambda p: image_bytes(upscaled(np.dstack([255 - p] * 3 + [np.where(p > 0, 255, 0)])
                                                 .astype(np.uint8)), "PNG"), _dark_on_white_png),
    "palette": (lambda p: image_bytes(upscaled(p).convert("P"), "PNG"), _photo_png),
    "16-bit": (lambda p: image_bytes(Image.fromarray(p.astype(np.uint16) * 257), "PNG"), _dataset_png),
    "CMYK JPEG": (_cmyk_jpeg, _dark_on_white_png),
    "EXIF-rotated": (lambda p: base64.b64decode(exif_rotated_jpeg(p)), _photo_png),
    "WebP": (lambda p: image_bytes(upscaled(255 - p), "WEBP", quality=90), _dark_on_white_png),
    "GIF": (lambda p: image_bytes(upscaled(255 - p), "GIF"), _dark_on_white_png),
    "animated GIF": (lambda p: image_bytes(upscaled(255 - p), "GIF", save_all=True,
                                        append_images=[Image.new("L", (300, 300), 255)], duration=100),
                     _dark_on_white_png),
    "BMP": (lambda p: image_bytes(upscaled(255 - p).convert("RGB"), "BMP"), _dark_on_white_png),
    "AVIF": (lambda p: image_bytes(upscaled(255 - p).convert("RGB"), "AVIF", quality=90), _dark_on_white_png),
}
BASE64_AS_PEOPLE_WRITE_IT = {  # name: the standard base64 of an image -> what people send
    "browser data URL": lambda b64: "data:image/png;base64," + b64,
    "coreutils base64 (76 columns)": lambda b64: "\n".join(b64[i:i + 76] for i in range(0, len(b64), 76)) + "\n",
    "URL-safe alphabet": lambda b64: b64.replace("+", "-").replace("/", "_"),
    "no padding": lambda b64: b64.rstrip("="),
}
N_UNUSUAL = 10  # test images per variant
MAX_MISREAD = 2  # of them read as another picture: lossy formats, the cut-out's placement
# Two readings whose seen images correlate at least this much are the same picture (a cut-out and its PNG: 0.89-0.97,
# the misplaced one 0.41); if the tiny test model still tells them apart, it is borderline, not the decoding.
SAME_PICTURE = 0.85


def _readings(url: str, encoded: list[str], name: str) -> tuple[list[int], list[np.ndarray]]:
    """The class and the 28x28 image the model saw, for each image."""
    response = _post(url, records(*[{"image": b64} for b64 in encoded], params={"return_seen": True}))
    assert response.status_code == 200, (name, response.text[:300])
    predictions = response.json()["predictions"]
    return [p["class_index"] for p in predictions], [np.array(p["seen"], float) for p in predictions]


def test_invocations_answers_unusual_but_valid_images_sensibly(scoring_url, dataset):
    """Each variant of 10 real test images (odd modes, EXIF rotation, every accepted format, the first frame
    of an animated GIF, base64 written as browsers and shells write it) is read as the same picture as an
    ordinary PNG of it: the same class, or, where the tiny test model is borderline, the same seen image;
    two may be read otherwise (lossy formats, the cut-out's placement). Degenerate sizes (1x1, 10000x10) get
    valid probabilities. (Against the same picture, not the raw pixels: how a photo-sized picture reads is
    the photo benchmark's business.)"""
    images = dataset.test_images[:N_UNUSUAL]
    expected = {reference: _readings(scoring_url, [b64(reference(img)) for img in images], reference.__name__)
                for reference in {reference for _, reference in UNUSUAL.values()} | {_dataset_png}}
    cases = {name: ([b64(variant(img)) for img in images], expected[reference])
             for name, (variant, reference) in UNUSUAL.items()}
    cases |= {name: ([written(png_base64(img)) for img in images], expected[_dataset_png])
              for name, written in BASE64_AS_PEOPLE_WRITE_IT.items()}
    assert any("+" in b64 or "/" in b64 for b64 in map(png_base64, images))  # the URL-safe case changes something
    for name, (encoded, (classes, seen)) in cases.items():
        got_classes, got_seen = _readings(scoring_url, encoded, name)
        misread = [a != b and correlation(x, y) < SAME_PICTURE
                   for a, b, x, y in zip(got_classes, classes, got_seen, seen, strict=True)]
        assert sum(misread) <= MAX_MISREAD, name
    for size in [(1, 1), (10000, 10)]:
        response = _post(scoring_url, _image(image_bytes(Image.new("L", size, 200), "PNG")))
        assert response.status_code == 200
        assert abs(sum(response.json()["predictions"][0]["probabilities"]) - 1) < 1e-4


# --- the UI ---


def _png_of_size(pixels: np.ndarray, size: int) -> bytes:
    """A valid PNG of exactly `size` bytes: the image plus a private ancillary chunk that decoders skip."""
    png = base64.b64decode(png_base64(pixels))
    padding = size - len(png) - 12  # chunk length, type and CRC
    chunk = b"prVt" + b"\0" * padding
    head = 8 + 25  # signature, IHDR
    return png[:head] + struct.pack(">I", padding) + chunk + struct.pack(">I", zlib.crc32(chunk)) + png[head:]


def _form_upload(ui_url: str, files: list[tuple[str, bytes]]) -> requests.Response:
    return harness.ui_session(ui_url).post(f"{ui_url}/predict", files=[("files", f) for f in files], timeout=120)


def test_ui_upload_size_boundary(ui_url, dataset):
    """A file of exactly MAX_FILE_BYTES is classified as the same image without its padding is; one byte more
    is refused with 413."""
    at_limit = _png_of_size(dataset.test_images[0], ui.MAX_FILE_BYTES)
    assert len(at_limit) == ui.MAX_FILE_BYTES
    plain = _form_upload(ui_url, [("plain.png", base64.b64decode(png_base64(dataset.test_images[0])))])
    response = _form_upload(ui_url, [("big.png", at_limit)])
    assert response.status_code == 200, response.text
    assert response.json()["results"][0]["class_name"] == plain.json()["results"][0]["class_name"]
    assert response.json()["results"][0]["probability"] == plain.json()["results"][0]["probability"]
    over = _png_of_size(dataset.test_images[0], ui.MAX_FILE_BYTES + 1)
    response = _form_upload(ui_url, [("bigger.png", over)])
    assert response.status_code == 413 and "larger than 5 MiB" in response.json()["message"]


@pytest.mark.parametrize("body", [
    b'{"images": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", b"[1]", b'"x"', b'{"images": 5}', b'{"images": [5]}',
    b'{"images": [null]}', b'{"images": [{"a": 1}]}', b'{"images": [[["x"]]]}',
    '{"images": ["\xe9"]}'.encode("latin-1"),
], ids=["nested 100,000 deep", "a list", "a string", "a number", "numbers", "nulls", "objects", "lists", "latin-1"])
def test_ui_json_api_answers_every_odd_body_with_a_4xx(ui_url, body):
    """The UI's JSON API answers any JSON shape or encoding with a 400 {error_code, message}, never a 500."""
    response = requests.post(f"{ui_url}/predict", data=body, headers={"Content-Type": "application/json"}, timeout=60)
    assert response.status_code == 400 and set(response.json()) == {"error_code", "message"}, response.text[:300]


@pytest.mark.parametrize("case, status, words", [
    ("no file", 400, "no file uploaded"),
    ("empty filename", 400, "no file uploaded"),
    ("too many files", 413, f"at most {ui.MAX_FILES}"),
    ("request over the total limit", 413, "in total"),
    ("PDF disguised as PNG", 400, "PDF is not accepted"),
    ("SVG disguised as PNG", 400, "SVG is not accepted"),
])
def test_ui_refuses_bad_uploads_clearly(ui_url, dataset, case, status, words):
    """Each bad form upload (none, empty, too many, too large, a PDF or SVG named .png) gets its 4xx with a clear
    message and no trace."""
    png = base64.b64decode(png_base64(dataset.test_images[0]))
    files = {"no file": [], "empty filename": [("", b"")],
             "too many files": [(f"{i}.png", png) for i in range(ui.MAX_FILES + 1)],
             "request over the total limit": [(f"{i}.png", _png_of_size(dataset.test_images[0], ui.MAX_FILE_BYTES))
                                              for i in range(ui.MAX_REQUEST_BYTES // ui.MAX_FILE_BYTES + 1)],
             "PDF disguised as PNG": [("a.png", b"%PDF-1.7\n1 0 obj\n<<>>\nendobj\n")],
             "SVG disguised as PNG": [("a.png", SVG)]}[case]
    response = _form_upload(ui_url, files) if files else harness.ui_session(ui_url).post(f"{ui_url}/predict",
                                                                                       data={"x": "1"}, timeout=30)
    assert response.status_code == status and words in response.json()["message"], response.text[:300]
    assert not any(leak in response.text for leak in LEAKS)


def test_ui_takes_images_as_people_send_them(ui_url, dataset):
    """The JSON API takes a browser data URL and wrapped base64; the form takes WebP, GIF, BMP and AVIF files."""
    png = png_base64(dataset.test_images[0])
    body = {"images": [BASE64_AS_PEOPLE_WRITE_IT[name](png) for name in BASE64_AS_PEOPLE_WRITE_IT]}
    answer = requests.post(f"{ui_url}/predict", json=body, timeout=30)
    assert answer.status_code == 200 and len({r["class_name"] for r in answer.json()["results"]}) == 1
    shoe = dataset.test_images[0]
    files = [(f"shoe.{name.lower()}", UNUSUAL[name][0](shoe)) for name in ("WebP", "GIF", "BMP", "AVIF")]
    answer = _form_upload(ui_url, files)
    assert answer.status_code == 200 and len(answer.json()["results"]) == 4, answer.text[:300]


def test_ui_page_offers_exactly_the_accepted_formats(ui_url):
    """The upload page names the formats the model accepts and lets the file picker choose exactly those."""
    page = requests.get(ui_url, timeout=30).text
    assert contract.ACCEPTED in page and f'accept="{contract.MEDIA_TYPES}"' in page


def test_ui_never_uses_the_client_filename_as_a_path(ui_url, dataset, tmp_path):
    """A filename with ../ is only echoed back as its last part."""
    png = base64.b64decode(png_base64(dataset.test_images[0]))
    response = _form_upload(ui_url, [("../../x.png", png)])
    assert response.status_code == 200 and response.json()["results"][0]["filename"] == "x.png"


def test_ui_wrong_method_and_unknown_path_are_json_without_traces(ui_url):
    """Wrong methods (405) and unknown paths (404) answer JSON errors without traces."""
    for response, status in ((requests.get(f"{ui_url}/predict", timeout=10), 405),
                             (requests.put(f"{ui_url}/predict", timeout=10), 405),
                             (requests.get(f"{ui_url}/no/such/page", timeout=10), 404),
                             (requests.get(f"{ui_url}/samples/99999.png", timeout=10), 404)):
        assert response.status_code == status and set(response.json()) == {"error_code", "message"}
        assert not any(leak in response.text for leak in LEAKS)


def test_ui_form_posts_need_the_csrf_token_and_the_json_api_needs_no_cookie(ui_url, dataset):
    """Form posts without the page's token, with a guessed one, or with the cookie alone get 403; the page's session
    succeeds; the JSON API works without a cookie; text/plain is treated as a form."""
    png = base64.b64decode(png_base64(dataset.test_images[0]))
    files = [("files", ("a.png", png, "image/png"))]
    # A cross-site form: no cookie, no token (or a guessed one).
    for headers in ({}, {"X-CSRF-Token": "guess"}):
        response = requests.post(f"{ui_url}/predict", files=files, headers=headers, timeout=30)
        assert response.status_code == 403 and "CSRF" in response.json()["message"]
    session = harness.ui_session(ui_url)  # loaded the page: cookie + token
    assert session.post(f"{ui_url}/predict", files=files, timeout=30).status_code == 200
    wrong = requests.Session()
    wrong.cookies.update(session.cookies)  # the cookie alone (a browser sends it) is not enough
    assert wrong.post(f"{ui_url}/predict", files=files, timeout=30).status_code == 403
    # text/plain is what a cross-site form can send: it is not the JSON API.
    body = json.dumps({"images": [png_base64(dataset.test_images[0])]})
    assert requests.post(f"{ui_url}/predict", data=body, headers={"Content-Type": "text/plain"},
                         timeout=30).status_code == 403
    response = requests.post(f"{ui_url}/predict", json={"images": [png_base64(dataset.test_images[0])]}, timeout=30)
    assert response.status_code == 200 and response.json()["results"][0]["class_name"]
    for bad in ({"images": []}, {"images": "x"}, [1], {"images": ["not base64!"]}):
        response = requests.post(f"{ui_url}/predict", json=bad, timeout=30)
        assert response.status_code == 400 and set(response.json()) == {"error_code", "message"}
    cookie = requests.get(ui_url, timeout=10).headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie


def test_ui_never_shows_the_upstream_error_body(dataset):
    """A scoring server that fails with a stack trace: the UI says 502 in its own words."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    from threading import Thread

    class Failing(BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            body = b'{"message": "boom", "stack_trace": "Traceback (most recent call last): File \\"/secret.py\\""}'
            self.send_response(500)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    upstream = ThreadingHTTPServer(("127.0.0.1", 0), Failing)
    Thread(target=upstream.serve_forever, daemon=True).start()
    try:
        client = ui.create_app(scoring_url=f"http://127.0.0.1:{upstream.server_port}").test_client()
        response = client.post("/predict", json={"images": [png_base64(dataset.test_images[0])]})
    finally:
        upstream.shutdown()
    assert response.status_code == 502 and "failed to answer" in response.get_json()["message"]
    assert "secret" not in response.get_data(as_text=True) and "boom" not in response.get_data(as_text=True)


# --- where the servers listen ---


def _non_loopback_address() -> str | None:
    """This machine's address on its default route, if it has one (a UDP connect sends nothing)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))  # TEST-NET-1: never routed anywhere
            address = s.getsockname()[0]
        except OSError:
            return None
    return None if address.startswith("127.") else address


def test_servers_bind_to_loopback_unless_told_otherwise(production, tracking_uri, tmp_path):
    """Both servers started with their defaults (no --host, as `python -m entrypoints.serve` and `.ui` run) are
    unreachable on the machine's other address, where a socket bound to 0.0.0.0 is reachable."""
    assert serve.DEFAULT_HOST == config.LOOPBACK == "127.0.0.1"
    assert container.parser().get_default("host") == config.LOOPBACK
    assert re.search(r"^HOST\s*\?=\s*127\.0\.0\.1$", (REPO / "Makefile").read_text(), re.M)
    address = _non_loopback_address()
    if address is None:
        pytest.skip("no network interface besides loopback to probe")
    with socket.socket() as exposed:  # the probe itself works: what binds everywhere is found
        exposed.bind(("0.0.0.0", 0))
        exposed.listen()
        socket.create_connection((address, exposed.getsockname()[1]), timeout=2).close()
    env = {**child_env(tracking_uri), "FMNIST_SCORING_URL": "http://127.0.0.1:1"}
    ports = {"entrypoints.serve": harness.free_port(), "entrypoints.ui": harness.free_port()}
    processes = [harness.start([str(harness.BIN / "python"), "-m", module, "--port", str(port)], env,
                               f"http://127.0.0.1:{port}/ping" if module.endswith("serve")
                               else f"http://127.0.0.1:{port}/", tmp_path / f"{module}.log")
                 for module, port in ports.items()]
    try:
        for port in ports.values():
            with socket.socket() as s, pytest.raises(OSError):
                s.settimeout(2)
                s.connect((address, port))
    finally:
        for process in processes:
            harness.stop(process)


def test_body_limits_fit_each_other():
    """The UI's largest request, base64-encoded for the scoring server, fits under its body limit."""
    largest_scoring_body = ui.MAX_REQUEST_BYTES * 4 / 3 + ui.MAX_FILES * 64  # base64 + JSON per image
    assert largest_scoring_body < transport.MAX_BODY_BYTES
    assert contract.MAX_IMAGE_BYTES * 4 / 3 < transport.MAX_BODY_BYTES
