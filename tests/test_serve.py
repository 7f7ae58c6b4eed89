"""The inference service (``timm-splat serve``) and its client (``timm-splat send``): the
per-request engine on its own, then a real server on a free local port, sent valid and
malformed requests, several at once, and stopped with SIGTERM."""

import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from PIL import Image

from timm_splat.cli import main
from timm_splat.codec import decode, encode
from timm_splat.testing import random_splats

if not os.environ.get("CI"):  # CI installs the serve extra: there a missing one fails
    pytest.importorskip("litserve", reason="the serve extra is not installed")

from timm_splat.serve.client import Client, prepare, send  # noqa: E402
from timm_splat.serve.engine import Engine, EngineConfig, Item, Rejected  # noqa: E402

CLASSES = "cat,dog,car"


@pytest.fixture(scope="module")
def engine():
    return Engine(EngineConfig(model="splat-ViT-test", classes=CLASSES, templates=["a {}."]))


@pytest.fixture(scope="module")
def photo(astronaut_64):
    buffer = io.BytesIO()
    astronaut_64.save(buffer, "PNG")
    return buffer.getvalue()


def _splat_bytes(count=50, seed=0, **kwargs):
    return encode(random_splats(1, count, torch.float32, seed=seed)[0], **kwargs)


# -- the engine ----------------------------------------------------------------------------


def test_engine_answers_splats_and_images(engine, photo):
    data = _splat_bytes()
    items = [engine.decode("splat", data), engine.decode("image", photo, topk=2)]
    assert all(isinstance(i, Item) for i in items)
    first, second = engine.predict(items)
    assert first["input"] == "splat" and first["num_splats"] == len(decode(data)) > 40
    assert len(first["embedding"]) == 32  # splat-ViT-test's embed_dim
    assert abs(sum(v * v for v in first["embedding"]) - 1) < 1e-4  # unit, as open_clip's
    scores = [t["score"] for t in first["topk"]]
    assert len(scores) == 3 and scores == sorted(scores, reverse=True)
    assert {t["label"] for t in first["topk"]} == set(CLASSES.split(","))
    assert second["input"] == "image" and len(second["topk"]) == 2
    assert second["server_ms"]["fit"] > 0 and second["server_ms"]["batch_size"] == 2
    assert engine.describe()["num_splats"] == 400


def test_an_answer_does_not_depend_on_its_batch(engine):
    items = [engine.decode("splat", _splat_bytes(seed=s)) for s in range(3)]
    together = engine.predict(items)
    for item, batched in zip(items, together):
        alone = engine.predict([item])[0]
        assert torch.allclose(
            torch.tensor(alone["embedding"]), torch.tensor(batched["embedding"]), atol=1e-4
        )


@pytest.mark.parametrize(
    "kind, data, status, words",
    [
        ("splat", b"PK\x03\x04junk", 400, "not a splat file"),
        ("splat", b"", 400, "shorter than the header"),
        ("splat", _splat_bytes(500), 413, "at most 400"),
        ("image", b"\x89PNG\r\n\x1a\nbroken", 400, "bad image"),
        ("image", _splat_bytes(), 400, "not an image format"),
        ("video", b"", 400, "unknown input kind"),
    ],
)
def test_engine_refuses_bad_bytes(engine, kind, data, status, words):
    refused = engine.decode(kind, data)
    assert isinstance(refused, Rejected) and refused.status == status
    assert words in refused.detail


def test_engine_refuses_damage_and_huge_images(engine):
    damaged = bytearray(_splat_bytes())
    damaged[30] ^= 4
    refused = engine.decode("splat", bytes(damaged))
    assert isinstance(refused, Rejected) and "CRC-32" in refused.detail
    buffer = io.BytesIO()
    Image.new("RGB", (5000, 4000)).save(buffer, "PNG")  # 53 KB that decode to 60 MP
    refused = engine.decode("image", buffer.getvalue())
    assert isinstance(refused, Rejected) and "resize it on the client" in refused.detail
    assert engine.decode("splat", _splat_bytes(), topk=9).status == 400


def test_rgb_and_classifier_engines(tmp_path, photo):
    import timm
    from timm.models import save_for_hf

    rgb = Engine(EngineConfig(model="ViT-Mini-7", classes=CLASSES, templates=["a {}."]))
    assert rgb.describe()["accepts"] == ["image"]
    assert rgb.decode("splat", _splat_bytes()).status == 415
    answer = rgb.predict([rgb.decode("image", photo)])[0]
    assert answer["input"] == "image" and answer["num_splats"] is None
    model = timm.create_model("splat_vit_test", num_classes=3)
    save_for_hf(model, tmp_path / "cls", safe_serialization=True)
    classifier = Engine(EngineConfig(pretrained=str(tmp_path / "cls"), classes=CLASSES))
    assert classifier.task == "classify"
    answer = classifier.predict([classifier.decode("splat", _splat_bytes())])[0]
    assert len(answer["embedding"]) == model.num_features and len(answer["topk"]) == 3
    with pytest.raises(ValueError, match="2 class names for a classifier of 3"):
        Engine(EngineConfig(pretrained=str(tmp_path / "cls"), classes="a,b"))


def test_client_prepares_what_the_server_reads(astronaut_64):
    info = {"input": "splats", "num_splats": 32, "image_size": [48, 48], "fit": None}
    payload, field, ms, quality = prepare(astronaut_64, info, "splat", iterations=20)
    assert field == "splat" and payload[:4] == b"SPLT" and ms > 0 and quality > 15
    payload, field, _, quality = prepare(astronaut_64, info, "jpeg", jpeg_quality=50)
    assert field == "image" and payload[:2] == b"\xff\xd8" and 20 < quality < 60
    assert Image.open(io.BytesIO(payload)).size == (48, 48)
    with pytest.raises(ValueError, match="reads pixels"):
        prepare(astronaut_64, {**info, "input": "pixels"}, "splat")


# -- a real server ---------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    port = _free_port()
    log = tmp_path_factory.mktemp("serve") / "server.log"
    command = [sys.executable, "-m", "timm_splat", "serve", "--model", "splat-ViT-test"]
    command += ["--classes", CLASSES, "--templates", "a {}.", "--port", str(port)]
    command += ["--max-batch-size", "4", "--batch-timeout", "0.05", "--workers", "2"]
    command += ["--max-request-bytes", "200000"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    with open(log, "w") as out:
        process = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while True:
        if process.poll() is not None:
            pytest.fail(f"the server exited with {process.returncode}: {log.read_text()[-3000:]}")
        try:
            status, _ = Client(url, timeout=5).get("/health")
            if status == 200:
                break
        except ValueError:
            pass
        if time.monotonic() > deadline:
            os.killpg(process.pid, signal.SIGKILL)
            pytest.fail(f"the server was not ready in 180 s: {log.read_text()[-3000:]}")
        time.sleep(0.5)
    yield url, process, log
    try:  # whatever is left of the server's process group (nothing, after the SIGTERM test)
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait(30)


def _post(url, body: bytes, content_type: str):
    client = Client(url)
    headers = {"Content-Type": content_type}
    try:
        status, data, _, _ = client._request("POST", "/predict", body, headers)
    finally:
        client.close()
    return status, json.loads(data)


def test_server_answers(server, astronaut_64):
    url, _, _ = server
    client = Client(url)
    info = client.info()
    assert info["model"] == "splat-ViT-test" and info["num_splats"] == 400
    assert client.get("/live")[0] == 200
    sent = send(client, astronaut_64, "astronaut", info, "splat", topk=2, iterations=10)
    assert sent.status == 200, sent.answer
    assert len(sent.answer["topk"]) == 2 and len(sent.answer["embedding"]) == 32
    assert sent.request_bytes > sent.payload_bytes > 100 and sent.round_trip_ms > 0
    sent = send(client, astronaut_64, "astronaut", info, "jpeg", embedding=False)
    assert sent.status == 200 and sent.answer["input"] == "image"
    assert "embedding" not in sent.answer and len(sent.answer["topk"]) == 3
    client.close()


def test_server_refuses_bad_requests_with_4xx(server):
    url, process, _ = server
    client = Client(url)
    damaged = bytearray(_splat_bytes())
    damaged[-3] ^= 1
    cases = [
        (client.predict("splat", b"not a splat file", "x.splat"), 400, "bad .splat bytes"),
        (client.predict("splat", bytes(damaged), "x.splat"), 400, "CRC-32"),
        (client.predict("image", b"\x00" * 100, "x.jpg"), 400, "bad image"),
        (client.predict("splat", bytes(300_000), "x.splat"), 413, "limit of 200000"),
        (client.predict("other", _splat_bytes(), "x.splat"), 400, "exactly one file field"),
        (client.predict("splat", _splat_bytes(), "x.splat", topk=0), 400, "topk"),
        (_post(url, b'{"splat": 1}', "application/json") + (0, 0), 415, "multipart"),
        (_post(url, b"junk", "multipart/form-data; boundary=zz") + (0, 0), 400, "multipart"),
    ]
    for (status, answer, *_), expected, words in cases:
        assert status == expected and words in answer["detail"], (status, answer)
    client.close()
    assert process.poll() is None


def test_a_bad_upload_does_not_fail_its_batch(server):
    """LitServe fails a whole batch when one request raises: refused requests are values, so
    the good ones batched with them are answered."""
    url, _, _ = server

    def one(index):
        client = Client(url)
        data = _splat_bytes(seed=index) if index % 2 else b"SPLT" + bytes(30)
        try:
            return client.predict("splat", data, "x.splat")
        finally:
            client.close()

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(one, range(16)))
    for index, (status, answer, _, _) in enumerate(answers):
        assert status == (200 if index % 2 else 400), answer
    assert max(a["server_ms"]["batch_size"] for s, a, *_ in answers if s == 200) > 1


def test_cli_send(server, tmp_path, astronaut_64, capsys):
    url, _, _ = server
    astronaut_64.save(tmp_path / "astronaut.png")
    code = main(
        ["send", str(tmp_path / "astronaut.png"), "--server", url, "--iterations", "10", "--json"]
    )
    assert code == 0
    record = json.loads(capsys.readouterr().out)
    assert record["status"] == 200 and record["as"] == "splat" and record["embedding_dim"] == 32
    assert record["request_bytes"] > record["payload_bytes"] and record["prepare_ms"] > 0
    assert main(["send", str(tmp_path / "missing.png"), "--server", url]) == 2
    port = _free_port()
    assert main(["send", str(tmp_path / "astronaut.png"), "--server", f"127.0.0.1:{port}"]) == 2
    assert "cannot reach" in capsys.readouterr().err


def test_cli_serve_refuses_bad_arguments(tmp_path, capsys):
    assert main(["serve"]) == 2
    assert main(["serve", "--pretrained", str(tmp_path / "nothing")]) == 2
    assert main(["serve", "--model", "splat-ViT-test", "--workers", "0"]) == 2
    assert "--workers must be positive" in capsys.readouterr().err


def test_sigterm_stops_the_server(server):
    """Last: stops the module's server. Graceful: the process exits by itself."""
    _, process, log = server
    children = subprocess.run(["pgrep", "-P", str(process.pid)], capture_output=True, text=True)
    children = [int(pid) for pid in children.stdout.split()]
    assert len(children) >= 3  # the HTTP server and two inference workers
    process.send_signal(signal.SIGTERM)
    try:
        assert process.wait(60) == 0
    except subprocess.TimeoutExpired:
        pytest.fail(f"the server did not stop in 60 s after SIGTERM: {log.read_text()[-2000:]}")
    assert "Application shutdown complete" in log.read_text()
    # None orphaned. A child may still be finishing its own exit when the parent is gone (the
    # multiprocessing resource tracker exits when its parent's pipe closes): a few seconds'
    # grace, not a process left running.
    deadline = time.monotonic() + 10
    for pid in children:
        while _running(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _running(pid), (pid, _state(pid))


def _running(pid: int) -> bool:
    return os.path.exists(f"/proc/{pid}") and "zombie" not in _state(pid)


def _state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/status") as status:
            return status.read().lower()
    except FileNotFoundError:
        return "zombie"
