"""`dfm serve` as a user starts it (the CLI in its own process) under a bounded load: 64
concurrent clients, 500 requests, some streamed, some dropped mid-stream; no request lost, no
memory kept; SIGTERM drains the requests in flight before the process exits."""

import concurrent.futures
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("uvicorn")

from dfm.cli import main  # noqa: E402
from tests.tiny_config import write_tiny_config  # noqa: E402

#: Resident memory the server may gain over 500 requests after a warm-up of 64: allocator
#: fragmentation and torch's caches, not a per-request leak (which would grow with the count).
RSS_MARGIN_MB = 60


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def _metrics(url: str) -> dict:
    with urllib.request.urlopen(f"{url}/metrics") as response:
        return json.loads(response.read())


@pytest.fixture
def start(tmp_path):
    """Start `dfm serve` on a tiny run with extra options; yields the process and its URL."""
    run = tmp_path / "run"
    assert main(["--quiet", "run", "--out", str(run), "--config", str(write_tiny_config(tmp_path))]) == 0
    children = []

    def started(*options: str):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
        cmd = [sys.executable, "-m", "dfm.cli", "--threads", "1", "serve", "--run", str(run), "--port", str(port)]
        child = subprocess.Popen([*cmd, *options], env=env, stderr=subprocess.PIPE, text=True)
        children.append(child)
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=1):
                    return child, url
            except OSError:
                assert child.poll() is None, child.stderr.read()
                time.sleep(0.2)
        raise AssertionError("the server did not start")

    yield started
    for child in children:
        if child.poll() is None:
            child.kill()
            child.wait()


def _request(client, i: int) -> str:
    if i % 7 == 3:  # dropped after the first chunk
        stream = client.completions.create(model="dfm", prompt=f"p{i}", max_tokens=30, stream=True, seed=i)
        next(iter(stream))
        stream.close()
        return "dropped"
    if i % 3 == 0:
        text = "".join(
            c.choices[0].text
            for c in client.completions.create(model="dfm", prompt=f"p{i}", max_tokens=8, stream=True, seed=i)
        )
        return "streamed" if isinstance(text, str) else "bad"
    answer = client.completions.create(model="dfm" if i % 5 else "baseline", prompt=f"p{i}", max_tokens=8, seed=i)
    return "done" if answer.choices[0].finish_reason in ("stop", "length") else "bad"


@pytest.mark.slow
def test_500_requests_from_64_clients_lose_nothing_and_keep_no_memory(start):
    child, url = start()
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=300)
    with concurrent.futures.ThreadPoolExecutor(64) as pool:
        assert set(pool.map(lambda i: _request(client, i), range(64))) <= {"done", "streamed", "dropped"}
        before = _rss_mb(child.pid)
        outcomes = list(pool.map(lambda i: _request(client, i), range(500)))
    after = _rss_mb(child.pid)
    assert outcomes.count("bad") == 0 and len(outcomes) == 500
    assert after - before <= RSS_MARGIN_MB, (before, after)
    metrics = _metrics(url)
    assert metrics["dfm"]["requests"] + metrics["baseline"]["requests"] == 564
    assert metrics["dfm"]["batch_occupancy"] > 1  # requests did share the batch


@pytest.mark.slow
def test_sigterm_drains_the_requests_in_flight(start):
    """One row at a time, so that when SIGTERM comes one request is decoding and the rest wait:
    every one of them still ends normally, then the process exits by the signal it got (uvicorn
    re-raises it after its graceful shutdown), with no traceback."""
    child, url = start("--max-batch", "1")
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=300)
    first = client.completions.create(model="dfm", prompt="q", max_tokens=60, stream=True, seed=0)
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        queued = [
            pool.submit(client.completions.create, model="dfm", prompt=f"q{i}", max_tokens=60, seed=i) for i in range(6)
        ]
        chunks = [next(iter(first))]
        deadline = time.monotonic() + 60
        while _metrics(url)["dfm"]["requests"] < 7 and time.monotonic() < deadline:  # all seven are in
            time.sleep(0.02)
        child.send_signal(signal.SIGTERM)
        chunks += list(first)
        answers = [f.result() for f in queued]
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    assert all(a.choices[0].finish_reason in ("stop", "length") for a in answers)
    assert child.wait(timeout=60) in (0, -signal.SIGTERM)
    assert "Traceback" not in child.stderr.read()
