"""`dfm serve` with a real client: the `openai` package against a server on a free local port,
and Starlette's TestClient for what a client library would not send (broken JSON, a wrong key)."""

import concurrent.futures
import json
import socket
import threading
import time
import urllib.error
import urllib.request

import pytest
import torch

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")
from starlette.testclient import TestClient  # noqa: E402

from dfm.cli import main  # noqa: E402
from eval.serve_app import MAX_BODY_BYTES, Server, create_app  # noqa: E402
from eval.serve_bench import serve_summary  # noqa: E402
from models.ar_kind import AR  # noqa: E402
from models.generation import generate_text  # noqa: E402
from models.serve_engine import Engine, RowSpec  # noqa: E402
from tests.tiny_config import TINY_RUN, write_tiny_config  # noqa: E402

PROMPTS = ["the", "a b", "", "lorem ipsum", "x", "one two three", "zz", "q"]


def _post(url: str, data: bytes) -> tuple[int, dict]:
    """A raw POST (what a client library would not send), with its status and JSON body."""
    request = urllib.request.Request(url, data=data, headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(request) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    out = root / "run"
    assert main(["--quiet", "run", "--out", str(out), "--config", str(write_tiny_config(root))]) == 0
    return out


@pytest.fixture(scope="module")
def served(run):
    server = Server(run, device=torch.device("cpu"), max_batch=4)
    port = _free_port()
    http = uvicorn.Server(uvicorn.Config(create_app(server), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=http.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not http.started and time.monotonic() < deadline:
        time.sleep(0.05)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
    yield server, client, f"http://127.0.0.1:{port}"
    http.should_exit = True
    thread.join(timeout=30)


@pytest.fixture(scope="module")
def ensemble(run):
    return AR.load_ensemble(run, "cpu")


def test_concurrent_requests_get_exactly_what_dfm_generate_gives(served, ensemble):
    """Eight prompts at once share the batch (4 rows at most, so some join mid-flight); each text
    is the one `dfm generate` gives that prompt alone: greedy, and sampled with its own seed."""
    _, client, _ = served

    def ask(i: int, temperature: float):
        extra = {"seed": 100 + i} if temperature else {}
        return client.completions.create(
            model="dfm", prompt=PROMPTS[i], max_tokens=10, temperature=temperature, **extra
        ).choices[0]

    for temperature in (0.0, 1.0):
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda i: ask(i, temperature), range(len(PROMPTS))))
        for i, answer in enumerate(answers):
            alone = generate_text(ensemble, PROMPTS[i], max_new_tokens=10, temperature=temperature, seed=100 + i)
            assert answer.text == alone.texts[0], (i, temperature)
            assert answer.finish_reason == (
                "stop" if alone.token_ids[0][-1] == ensemble.tokenizer.eos_token_id else "length"
            )
    assert served[0].engines["dfm"].stats["rebuilds"] >= 2  # rows joined a running batch


def test_streaming_sends_the_same_text_in_chunks(served):
    _, client, _ = served
    whole = client.completions.create(model="dfm", prompt="the", max_tokens=12, temperature=0).choices[0].text
    chunks = list(client.completions.create(model="dfm", prompt="the", max_tokens=12, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == whole
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    assert len(chunks) > 1


def test_n_seed_logprobs_usage_and_echo(served):
    _, client, _ = served
    many = client.completions.create(model="dfm", prompt="a", max_tokens=6, n=3, seed=7, logprobs=2, echo=True)
    assert [c.index for c in many.choices] == [0, 1, 2]
    single = client.completions.create(model="dfm", prompt="a", max_tokens=6, seed=8)
    assert many.choices[1].text == "a" + single.choices[0].text  # choice j draws with seed + j
    for c in many.choices:
        assert len(c.logprobs.token_logprobs) == len(c.logprobs.tokens) == len(c.logprobs.top_logprobs)
        assert all(1 <= len(top) <= 2 for top in c.logprobs.top_logprobs)
        assert all(
            lp <= max(top.values()) + 1e-6 for lp, top in zip(c.logprobs.token_logprobs, c.logprobs.top_logprobs)
        )
    tokens = sum(len(c.logprobs.tokens) for c in many.choices)
    assert many.usage.completion_tokens == tokens and many.usage.prompt_tokens == 1
    assert many.usage.total_tokens == tokens + 1


def test_routing_options_travel_in_the_extra_body(served, ensemble):
    _, client, _ = served
    top1 = client.completions.create(
        model="dfm", prompt="the", max_tokens=8, temperature=0, extra_body={"routing": "top1", "return_routing": True}
    ).choices[0]
    assert all(len(step) == 1 for step in top1.model_extra["routing"])
    for routing in ("top1", "bayes", "switch"):
        served_text = (
            client.completions.create(model="dfm", prompt="a b", max_tokens=8, seed=3, extra_body={"routing": routing})
            .choices[0]
            .text
        )
        mode, k = ("topk", 1) if routing == "top1" else (routing, None)
        alone = generate_text(ensemble, "a b", max_new_tokens=8, routing=mode, k=k, seed=3)
        assert served_text == alone.texts[0], routing
    kept = client.completions.create(
        model="dfm",
        prompt="x",
        max_tokens=6,
        temperature=0,
        extra_body={"exclude_experts": [0, 1], "return_routing": True},
    ).choices[0]
    assert {e for step in kept.model_extra["routing"] for e in step} == {"expert-2"}


def test_the_baseline_and_each_expert_are_models(served, run):
    _, client, _ = served
    assert [m.id for m in client.models.list().data] == ["dfm", "expert-0", "expert-1", "expert-2", "baseline"]
    baseline = AR.load_model(run, "baseline", "cpu", None)
    answer = client.completions.create(model="baseline", prompt="the", max_tokens=8, temperature=0).choices[0].text
    assert answer == generate_text(baseline, "the", max_new_tokens=8, temperature=0).texts[0]
    expert = client.completions.create(
        model="expert-1", prompt="the", max_tokens=8, temperature=0, extra_body={"return_routing": True}
    ).choices[0]
    assert {e for step in expert.model_extra["routing"] for e in step} == {"expert-1"}


def test_a_stop_string_ends_the_text_before_it(served):
    _, client, _ = served
    free = client.completions.create(model="dfm", prompt="the", max_tokens=12, temperature=0).choices[0].text
    stop = free[3:5]
    if not stop.strip("\ufffd"):
        pytest.skip("the tiny model's greedy text has no stop string to cut at")
    cut = client.completions.create(model="dfm", prompt="the", max_tokens=12, temperature=0, stop=[stop]).choices[0]
    assert cut.finish_reason == "stop" and cut.text == free[: free.index(stop)]
    streamed = client.completions.create(
        model="dfm", prompt="the", max_tokens=12, temperature=0, stop=[stop], stream=True
    )
    assert "".join(c.choices[0].text for c in streamed) == cut.text


def test_bad_requests_get_openai_error_bodies_and_the_server_goes_on(served):
    _, client, url = served
    bad = [
        ({"extra_body": {"routing": "nope"}}, "unknown routing"),
        ({"extra_body": {"routing": "topk", "k": 9}}, "between 1 and"),
        ({"max_tokens": 10_000}, "no room for a prompt"),
        ({"prompt": "word " * 200, "max_tokens": 10}, "more than the context"),
        ({"extra_body": {"exclude_experts": [0, 1, 2]}}, "excluding every expert"),
        ({"extra_body": {"exclude_experts": ["expert-9"]}}, "unknown expert"),
        ({"temperature": -1.0}, "temperature"),
        ({"temperature": 1e-300}, "greedy in effect"),
        ({"extra_body": {"routing": "topk", "k": 0}}, "between 1 and"),
        ({"extra_body": {"routing": "centroid", "k": 9}}, "between 1 and"),
        ({"model": "expert-0", "extra_body": {"exclude_experts": ["expert-0"]}}, "also in exclude_experts"),
        ({"seed": 2**63 - 1, "n": 2}, "seed + n - 1"),
        ({"stream": True, "extra_body": {"stream_options": "usage"}}, "stream_options"),
    ]
    for options, words in bad:
        request = {"model": "dfm", "prompt": "a", "max_tokens": 4, **options}
        with pytest.raises(openai.BadRequestError) as caught:
            client.completions.create(**request)
        assert words in caught.value.body["message"], (options, caught.value.body)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt="a", max_tokens=4)
    status, body = _post(f"{url}/v1/completions", b"{not json")
    assert status == 400 and "not valid JSON" in body["error"]["message"]
    status, body = _post(f"{url}/v1/completions", json.dumps({"prompt": "a" * 10_000_000}).encode())
    assert status == 413 and str(MAX_BODY_BYTES) in body["error"]["message"]
    with urllib.request.urlopen(f"{url}/health") as response:
        assert json.loads(response.read())["status"] == "ok"
    assert client.completions.create(model="dfm", prompt="a", max_tokens=3).choices[0].finish_reason
    # the smallest temperature allowed is greedy in effect, never a NaN that would fail the batch
    greedy = client.completions.create(model="dfm", prompt="the", max_tokens=6, temperature=0).choices[0].text
    assert (
        client.completions.create(model="dfm", prompt="the", max_tokens=6, temperature=1e-30).choices[0].text == greedy
    )


def test_rows_that_would_overflow_the_context_together_take_turns(ensemble):
    """A long prompt with few new tokens and a short one with many each fit the context of 64,
    but not left-padded into one batch: the second waits, and both get generate's text."""
    engine = Engine(ensemble, max_batch=4)
    specs = {
        "long": RowSpec(prompt=[7] * 50, max_tokens=10, temperature=0),
        "short": RowSpec(prompt=[7], max_tokens=60, temperature=0),
    }
    ended = {}
    for name, spec in specs.items():
        engine.submit([spec], lambda i, event, name=name: event.finish and ended.setdefault(name, event))
    for _ in range(1000):
        if len(ended) == 2:
            break
        engine.work_once()
    for name, spec in specs.items():
        assert ended[name].finish in ("stop", "length"), ended[name].finish
        alone = generate_text(ensemble, [spec.prompt], max_new_tokens=spec.max_tokens, temperature=0)
        assert ended[name].history["tokens"][: len(alone.token_ids[0])] == alone.token_ids[0], name


def test_a_client_gone_mid_stream_frees_its_rows(served):
    server, client, url = served
    engine = server.engines["dfm"]
    data = json.dumps({"prompt": "the", "max_tokens": 60, "stream": True}).encode()
    request = urllib.request.Request(f"{url}/v1/completions", data=data, headers={"content-type": "application/json"})
    with urllib.request.urlopen(request) as response:
        assert response.readline().startswith(b"data: ")  # then the client goes
    deadline = time.monotonic() + 30
    while any(not row.done for row in engine._rows) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert all(row.done for row in engine._rows)
    with urllib.request.urlopen(f"{url}/metrics") as response:
        metrics = json.loads(response.read())
    assert metrics["dfm"]["requests"] >= 1 and metrics["dfm"]["batch_occupancy"] > 0


def test_a_client_gone_before_its_answer_frees_its_rows(run):
    """Nobody steps this server's engine, so the rows of a request wait; the client hangs up and
    the server cancels them, as it does for a dropped stream."""
    server = Server(run, device=torch.device("cpu"), max_batch=4, threaded=False)
    port = _free_port()
    http = uvicorn.Server(uvicorn.Config(create_app(server), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=http.run, daemon=True)
    thread.start()
    while not http.started:
        time.sleep(0.05)
    engine = server.engines["dfm"]
    body = json.dumps({"prompt": "the", "max_tokens": 20, "n": 3}).encode()
    with socket.create_connection(("127.0.0.1", port)) as sock:
        head = "POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        sock.sendall(f"{head}content-length: {len(body)}\r\n\r\n".encode() + body)
        deadline = time.monotonic() + 10
        while len(engine._waiting) < 3 and time.monotonic() < deadline:
            time.sleep(0.02)
    deadline = time.monotonic() + 10
    while not all(row.cancelled for row in engine._waiting) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(engine._waiting) == 3 and all(row.cancelled for row in engine._waiting)
    engine.work_once()
    assert engine.stats["cancelled"] == 3 and not engine._waiting
    http.should_exit = True
    thread.join(timeout=30)


def test_an_api_key_is_required_when_set(run):
    server = Server(run, device=torch.device("cpu"), api_key="secret")
    with TestClient(create_app(server)) as client:
        refused = client.post("/v1/completions", json={"prompt": "a", "max_tokens": 2})
        assert refused.status_code == 401 and refused.json()["error"]["type"] == "authentication_error"
        ok = client.post(
            "/v1/completions", json={"prompt": "a", "max_tokens": 2}, headers={"authorization": "Bearer secret"}
        )
        assert ok.status_code == 200 and ok.json()["choices"][0]["text"] is not None
        assert client.get("/health").status_code == 200


def test_the_serving_benchmark_pairs_every_load_with_the_baseline(run, tmp_path, capsys):
    out = tmp_path / "serve.json"
    assert main(["--quiet", "bench", "--serve", str(run), "--quick", "--out", str(out)]) == 0
    results = json.loads(out.read_text())
    keys = [(r["clients"], r["model"], r["repeat"]) for r in results["rounds"]]
    assert sorted(keys) == sorted((c, m, i) for c in (1, 4) for m in ("baseline", "top1", "mixture") for i in (0, 1))
    for r in results["rounds"]:
        assert r["requests"] == 8 and 0 < r["tokens"] <= 8 * 8 and r["tokens_per_second"] > 0
        assert r["ttft_p50"] <= r["ttft_p99"]
    assert sorted((r["model"], r["repeat"]) for r in results["overhead"]) == [
        ("mixture", 0),
        ("mixture", 1),
        ("top1", 0),
        ("top1", 1),
    ]
    for r in results["overhead"]:  # greedy: generate_text decodes exactly the served tokens, both ways
        assert r["generate_tokens"] == r["one_response_tokens"] == r["streamed_tokens"]
        rounds = [x for x in results["rounds"] if x["clients"] == 1 and x["model"] == r["model"]]
        assert all(x["tokens"] == r["generate_tokens"] for x in rounds)
    for row in serve_summary(results):  # a ratio is paired: the baseline's own is exactly 1
        assert row["vs_baseline"] == 1.0 if row["model"] == "baseline" else row["vs_baseline"] > 0
    assert "vs baseline" in capsys.readouterr().out


def test_a_masked_run_serves_its_n_step_sampler(tmp_path):
    from models.generation_request import GenerationRequest
    from models.masked_kind import MASKED
    from tests.test_masked_pipeline import TINY_MASKED_ARCH

    out, config = tmp_path / "masked", tmp_path / "masked.json"
    config.write_text(
        json.dumps({**TINY_RUN, "path": {"kind": "masked"}, "expert": {**TINY_RUN["expert"], "arch": TINY_MASKED_ARCH}})
    )
    assert main(["--quiet", "run", "--out", str(out), "--config", str(config)]) == 0
    server = Server(out, device=torch.device("cpu"))
    with TestClient(create_app(server)) as client:
        body = {"prompt": "a b", "max_tokens": 6, "steps": 4, "seed": 5, "n": 2}
        answer = client.post("/v1/completions", json=body)
        assert answer.status_code == 200
        for j, choice in enumerate(answer.json()["choices"]):
            request = GenerationRequest(max_new_tokens=6, sampler_steps=4, seed=5 + j)
            assert choice["text"] == MASKED.generate(server.masked.ensemble, ["a b"], request).texts[0]
        streamed = client.post("/v1/completions", json={**body, "stream": True})
        assert streamed.status_code == 400 and "stream=false" in streamed.json()["error"]["message"]
        bayes = client.post("/v1/completions", json={**body, "routing": "bayes"})
        assert bayes.status_code == 400 and "on a masked run" in bayes.json()["error"]["message"]
