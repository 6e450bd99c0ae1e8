"""`dfm serve`: a run behind the OpenAI completions API (Starlette on uvicorn, the `serve` extra).

Models: ``dfm`` (the routed ensemble), ``expert-N`` (one expert alone, through the same engine)
and ``baseline`` (the central model, its own engine), so a client compares them on one server.
dfm's own options travel as extra body fields (the ``openai`` client's ``extra_body``):
``routing``, ``k``, ``exclude_experts``, ``route_on``, ``top_k``, ``return_routing``. Errors are
OpenAI-style JSON bodies with a 4xx status; the server never stops on a bad request.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import threading
import time
import uuid
from pathlib import Path

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from dfm.errors import DfmError
from dfm.routing import Routing, parse_mode
from dfm.sampling import check_seed
from models.generation_request import DEFAULT_SAMPLER_STEPS, GenerationRequest
from models.partition import Partition
from models.serve_engine import Engine, Event, RowSpec, run_engines
from training.config import read_run_config
from training.layout import RunLayout

#: The largest request body read (a prompt is text; a 10 MB one is refused before it is parsed).
MAX_BODY_BYTES = 1_000_000
MAX_CHOICES = 64
DISCONNECT_POLL_SECONDS = 0.25  # how often a non-streamed request asks whether its client is still there


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, message, kind, param

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": None}}
        return JSONResponse(body, status_code=self.status)


class Server:
    """The engines of one run and the request handling around them."""

    def __init__(
        self, run_dir: str | Path, *, device, max_batch: int = 16, api_key: str | None = None, threaded: bool = True
    ):
        config = read_run_config(run_dir)
        kind = config.kind
        ensemble = kind.load_ensemble(run_dir, device)
        self.api_key = api_key
        self.threaded = threaded  # engines in threads of their own; else `serve` steps them on the main thread
        self.started = time.time()
        self.experts = list(ensemble.names)
        self.tokenizer = ensemble.tokenizer
        if config.is_masked:
            self.engines: dict[str, Engine] = {}
            self.masked = MaskedSampler(kind, ensemble)
            return
        self.masked = None
        layout = RunLayout.of(run_dir)
        partition = Partition.load(layout.partition) if (layout.partition / "partition.json").is_file() else None
        wake = threading.Event()  # one for both engines, so that one loop can sleep on it
        self.engines = {"dfm": Engine(ensemble, max_batch=max_batch, partition=partition, name="dfm", wake=wake)}
        if layout.baseline.is_dir():
            baseline = kind.load_model(run_dir, "baseline", device, None)
            self.engines["baseline"] = Engine(baseline, max_batch=max_batch, name="baseline", wake=wake)

    # --- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        if self.threaded:
            for engine in self.engines.values():
                engine.start()

    def stop(self) -> None:
        for engine in self.engines.values():
            engine.stop()

    def models(self) -> list[str]:
        return ["dfm", *self.experts, *(["baseline"] if "baseline" in self.engines else [])]

    # --- requests ----------------------------------------------------------------------------
    def authorize(self, request: Request) -> None:
        if self.api_key is not None and request.headers.get("authorization") != f"Bearer {self.api_key}":
            raise ApiError(401, "invalid or missing API key: send 'Authorization: Bearer KEY'", "authentication_error")

    async def body(self, request: Request) -> dict:
        size, chunks = 0, []
        async for chunk in request.stream():  # read to the end (a client still sending gets its answer), keep little
            size += len(chunk)
            if size <= MAX_BODY_BYTES:
                chunks.append(chunk)
        if size > MAX_BODY_BYTES:
            raise ApiError(413, f"request body of {size} bytes is larger than {MAX_BODY_BYTES}: send a shorter prompt")
        try:
            body = json.loads(b"".join(chunks) or b"null")
        except (ValueError, UnicodeDecodeError) as err:
            raise ApiError(400, f"the body is not valid JSON ({err})") from err
        if not isinstance(body, dict):
            raise ApiError(400, "the body must be a JSON object")
        return body

    def specs(self, body: dict) -> tuple[str, Engine, list[str], list[list[int]], list[RowSpec]]:
        """The model, its engine, the prompts (text and ids) and one RowSpec per choice."""
        model = body.get("model", "dfm")
        if model not in self.models():
            raise ApiError(404, f"model {model!r} not found: choose one of {', '.join(self.models())}", param="model")
        engine = self.engines["baseline" if model == "baseline" else "dfm"]
        prompt = body.get("prompt", "")
        prompts = [prompt] if isinstance(prompt, str) else prompt
        if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
            raise ApiError(400, "prompt must be a string or a non-empty list of strings", param="prompt")
        n = _integer(body, "n", 1, lo=1)
        if n * len(prompts) > MAX_CHOICES:
            raise ApiError(400, f"n x prompts is {n * len(prompts)}: at most {MAX_CHOICES} choices per request")
        stop = body.get("stop") or []
        stop = [stop] if isinstance(stop, str) else stop
        if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
            raise ApiError(400, "stop must be a string or a list of at most 4 non-empty strings", param="stop")
        logprobs = body.get("logprobs")
        if logprobs is not None and (not isinstance(logprobs, int) or not 0 <= logprobs <= 20):
            raise ApiError(400, "logprobs must be an integer from 0 to 20", param="logprobs")
        exclude = body.get("exclude_experts") or []
        if not isinstance(exclude, list):
            raise ApiError(400, "exclude_experts must be a list of expert names or indices", param="exclude_experts")
        excluded = tuple(self._expert_index(e) for e in exclude)
        seed = _seed(body, n)
        if not isinstance(body.get("stream_options") or {}, dict):
            raise ApiError(
                400, 'stream_options must be an object such as {"include_usage": true}', param="stream_options"
            )
        ids = [self.tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
        options = {
            "max_tokens": _integer(body, "max_tokens", 16, lo=1),
            "routing": body.get("routing", "mixture"),
            "k": body.get("k"),
            "exclude": excluded,
            "route_on": body.get("route_on", "token"),
            "expert": self.experts.index(model) if model in self.experts else None,
            "temperature": _number(body, "temperature", 1.0),
            "top_p": _number(body, "top_p", 1.0),
            "top_k": _integer(body, "top_k", 0, lo=0),
            "stop": tuple(stop),
            "logprobs": logprobs,
            "stream": bool(body.get("stream")),
        }
        if model == "baseline" and (options["routing"] != "mixture" or excluded):
            raise ApiError(400, "the baseline is one model: routing and exclude_experts do not apply", param="model")
        if options["k"] is not None and not isinstance(options["k"], int):
            raise ApiError(400, "k must be an integer", param="k")
        specs = [RowSpec(prompt=row, seed=seed + j, **options) for row in ids for j in range(n)]
        for spec in specs:
            try:
                engine.check(spec)
            except DfmError as err:
                raise ApiError(400, str(err)) from err
        return model, engine, prompts, ids, specs

    def _expert_index(self, name: object) -> int:
        if isinstance(name, int) and not isinstance(name, bool):
            return name
        if isinstance(name, str) and name in self.experts:
            return self.experts.index(name)
        raise ApiError(
            400, f"unknown expert {name!r}: the experts are {', '.join(self.experts)}", "invalid_request_error"
        )

    def metrics(self) -> dict:
        out = {"uptime_seconds": round(time.time() - self.started, 1)}
        if self.masked is not None:
            out["dfm"] = dict(self.masked.stats)
        for name, engine in self.engines.items():
            stats = dict(engine.stats)
            busy = stats.pop("busy_seconds")
            out[name] = {
                **stats,
                "busy_seconds": round(busy, 3),
                "tokens_per_second": stats["tokens"] / busy if busy else 0.0,
                "batch_occupancy": engine.occupancy,
                "expert_tokens": dict(zip(self.experts if name == "dfm" else ["baseline"], engine.expert_tokens)),
            }
        return out


class MaskedSampler:
    """A masked run's N-step sampler behind the same endpoint: one sampling call per choice, one at
    a time (its rows share a generator, so batching choices would make a text depend on its
    neighbours); the text appears whole after the last step, so streaming is refused."""

    def __init__(self, kind, ensemble):
        self.kind, self.ensemble = kind, ensemble
        self.lock = threading.Lock()
        self.stats = {"requests": 0, "tokens": 0, "busy_seconds": 0.0}

    def requests(self, body: dict, experts: list[str], model: str) -> list[GenerationRequest]:
        if body.get("stream"):
            raise ApiError(
                400, "a masked run reveals its text in N parallel steps, not token by token: send stream=false"
            )
        for key in ("logprobs", "top_p", "top_k", "route_on", "echo"):
            if body.get(key) not in (None, False, 1.0 if key == "top_p" else None):
                raise ApiError(
                    400,
                    f"{key} applies to autoregressive runs only; a masked run takes steps, routing, k, temperature",
                    param=key,
                )
        routing, k = parse_mode(str(body.get("routing", "mixture")))
        if body.get("routing", "mixture") not in self.kind.eval_modes or routing is Routing.ORACLE:
            modes = [m for m in self.kind.eval_modes if m != "oracle"]
            raise ApiError(
                400, f"unknown routing {body.get('routing')!r} on a masked run: choose one of {', '.join(modes)}"
            )
        exclude = [
            experts.index(e) if isinstance(e, str) and e in experts else e for e in body.get("exclude_experts") or []
        ]
        if model in experts:
            exclude = [i for i in range(len(experts)) if experts[i] != model]
        n = _integer(body, "n", 1, lo=1)
        if n > MAX_CHOICES:
            raise ApiError(400, f"n is {n}: at most {MAX_CHOICES} choices per request", param="n")
        seed = _seed(body, n)
        return [
            GenerationRequest(
                max_new_tokens=_integer(body, "max_tokens", 16, lo=1),
                routing=routing,
                k=body.get("k", k),
                temperature=_number(body, "temperature", 1.0),
                seed=seed + j,
                exclude=tuple(exclude),
                sampler_steps=_integer(body, "steps", DEFAULT_SAMPLER_STEPS, lo=1),
            )
            for j in range(n)
        ]

    def complete(self, prompt: str, request: GenerationRequest) -> list[int]:
        with self.lock:
            started = time.perf_counter()
            ids = self.kind.generate(self.ensemble, [prompt], request).token_ids[0]
            self.stats["requests"] += 1
            self.stats["tokens"] += len(ids)
            self.stats["busy_seconds"] += time.perf_counter() - started
        return ids


def _integer(body: dict, key: str, default: int, lo: int | None = None) -> int:
    value = body.get(key)
    if value is None:
        return default
    if not isinstance(value, int) or isinstance(value, bool) or (lo is not None and value < lo):
        raise ApiError(400, f"{key} must be an integer" + (f" >= {lo}" if lo is not None else ""), param=key)
    return value


def _seed(body: dict, n: int) -> int:
    """The request's seed; choice j draws with seed + j, so every one of them must be a valid seed."""
    seed = _integer(body, "seed", 0)
    try:
        check_seed(seed + n - 1, "seed + n - 1")
    except DfmError as err:
        raise ApiError(400, str(err), param="seed") from err
    return seed


def _number(body: dict, key: str, default: float) -> float:
    value = body.get(key)
    if value is None:
        return default
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise ApiError(400, f"{key} must be a number", param=key)
    return float(value)


class _Choice:
    """One choice's accumulating output, fed by engine events on the event loop."""

    def __init__(self, tokenizer, spec: RowSpec, echo: str | None):
        self.tokenizer, self.spec, self.echo = tokenizer, spec, echo
        self.text, self.sent = "", 0
        self.tokens: list[int] = []
        self.logprobs: list[float] = []
        self.top: list[dict] = []
        self.experts: list[list[int]] = []
        self.finish: str | None = None

    def add(self, event: Event) -> None:
        if event.history is not None:  # the last event: the whole row
            history = event.history
            self.tokens, self.logprobs, self.experts = history["tokens"], history["logprobs"], history["experts"]
            self.top = [top or {} for top in history["top"]]
        self.text = event.text
        self.finish = event.finish if self.finish is None else self.finish

    def pending(self) -> str:
        """New text safe to send: not a possible start of a stop string, not a half character."""
        ready = len(self.text)
        if self.finish is None:
            for stop in self.spec.stop:
                for cut in range(min(len(stop) - 1, len(self.text)), 0, -1):
                    if self.text.endswith(stop[:cut]):
                        ready = min(ready, len(self.text) - cut)
                        break
            while ready > self.sent and self.text[ready - 1] == "\ufffd":
                ready -= 1
        delta = self.text[self.sent : ready] if ready > self.sent else ""
        self.sent = max(self.sent, ready)
        return delta

    def logprob_block(self) -> dict | None:
        if self.spec.logprobs is None:
            return None
        decode = self.tokenizer.decode
        strings = [decode([t]) for t in self.tokens]
        # where each token starts in the text: lengths of the decoded prefixes (a character split
        # over two byte tokens, or a tokenizer that merges spaces, keeps the offsets true)
        offsets = [len(self.echo or "") + len(decode(self.tokens[:i])) for i in range(len(self.tokens))]
        return {
            "tokens": strings,
            "token_logprobs": self.logprobs,
            "top_logprobs": [{decode([t]): v for t, v in top.items()} for top in self.top],
            "text_offset": offsets,
        }


def create_app(server: Server) -> Starlette:
    """The ASGI application; its lifespan starts and stops the engines."""

    async def guarded(request: Request, handler) -> JSONResponse | StreamingResponse:
        try:
            server.authorize(request)
            return await handler(request)
        except ApiError as err:
            return err.response()
        except DfmError as err:  # a check of the library's own that the fields above did not catch
            return ApiError(400, str(err)).response()

    async def health(request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok", "models": server.models()})

    async def models(request: Request):
        async def handler(request):
            data = [
                {"id": m, "object": "model", "created": int(server.started), "owned_by": "dfm"} for m in server.models()
            ]
            return JSONResponse({"object": "list", "data": data})

        return await guarded(request, handler)

    async def metrics(request: Request):
        async def handler(request):
            return JSONResponse(server.metrics())

        return await guarded(request, handler)

    async def completions(request: Request):
        async def handler(request):
            body = await server.body(request)
            if server.masked is not None:
                return await masked_completion(body)
            model, engine, prompts, ids, specs = server.specs(body)
            echo = bool(body.get("echo"))
            n = len(specs) // len(prompts)
            choices = [
                _Choice(server.tokenizer, spec, prompts[i // n] if echo else None) for i, spec in enumerate(specs)
            ]
            queue: asyncio.Queue = asyncio.Queue()
            loop = asyncio.get_running_loop()
            try:
                cancel = engine.submit(specs, lambda i, event: loop.call_soon_threadsafe(queue.put_nowait, (i, event)))
            except DfmError as err:  # the checks passed in specs(): what is left is a server shutting down
                raise ApiError(503, str(err), "server_error") from err
            ident, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())

            def usage() -> dict:
                prompt_tokens = sum(len(row) for row in ids)
                completion = sum(len(c.tokens) for c in choices)
                return {
                    "prompt_tokens": prompt_tokens,
                    "completion_tokens": completion,
                    "total_tokens": prompt_tokens + completion,
                }

            def choice_body(i: int, c: _Choice, text: str, logprobs: bool = True) -> dict:
                out = {"index": i, "text": text, "logprobs": c.logprob_block() if logprobs else None}
                out["finish_reason"] = c.finish
                if body.get("return_routing"):
                    names = server.experts if model != "baseline" else ["baseline"]
                    out["routing"] = [[names[e] for e in step] for step in c.experts]
                return out

            if not body.get("stream"):
                getter = asyncio.ensure_future(queue.get())
                try:
                    while any(c.finish is None for c in choices):
                        done, _ = await asyncio.wait({getter}, timeout=DISCONNECT_POLL_SECONDS)
                        if not done:
                            if await request.is_disconnected():  # nobody to answer: free the rows
                                cancel()
                                return JSONResponse({}, status_code=499)
                            continue
                        i, event = getter.result()
                        choices[i].add(event)
                        getter = asyncio.ensure_future(queue.get())
                except asyncio.CancelledError:
                    cancel()
                    raise
                finally:
                    getter.cancel()
                failed = [c.finish for c in choices if c.finish.startswith("error")]
                if failed:
                    raise ApiError(500, f"generation failed: {failed[0]}", "server_error")
                return JSONResponse(
                    {
                        "id": ident,
                        "object": "text_completion",
                        "created": created,
                        "model": model,
                        "choices": [choice_body(i, c, (c.echo or "") + c.text) for i, c in enumerate(choices)],
                        "usage": usage(),
                    }
                )

            async def events():
                def chunk(payload: list[dict]) -> str:
                    data = {"id": ident, "object": "text_completion", "created": created, "model": model}
                    return f"data: {json.dumps({**data, 'choices': payload})}\n\n"

                try:
                    if echo:
                        yield chunk(
                            [
                                {"index": i, "text": c.echo, "logprobs": None, "finish_reason": None}
                                for i, c in enumerate(choices)
                            ]
                        )
                    while any(c.finish is None for c in choices):
                        i, event = await queue.get()
                        c = choices[i]
                        c.add(event)
                        delta = c.pending()
                        if delta or c.finish is not None:
                            yield chunk([choice_body(i, c, delta, logprobs=False)])
                    if (body.get("stream_options") or {}).get("include_usage"):
                        data = {"id": ident, "object": "text_completion", "created": created, "model": model}
                        yield f"data: {json.dumps({**data, 'choices': [], 'usage': usage()})}\n\n"
                    yield "data: [DONE]\n\n"
                finally:
                    cancel()  # a client gone mid-stream frees its rows at the next step

            return StreamingResponse(events(), media_type="text/event-stream")

        return await guarded(request, handler)

    async def masked_completion(body: dict) -> JSONResponse:
        model = body.get("model", "dfm")
        if model not in server.models():
            raise ApiError(404, f"model {model!r} not found: choose one of {', '.join(server.models())}", param="model")
        prompt = body.get("prompt", "")
        prompts = [prompt] if isinstance(prompt, str) else prompt
        if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
            raise ApiError(400, "prompt must be a string or a non-empty list of strings", param="prompt")
        requests = server.masked.requests(body, server.experts, model)
        choices = []
        try:
            for prompt in prompts:
                for request in requests:
                    ids = await asyncio.to_thread(server.masked.complete, prompt, request)
                    choices.append(ids)
        except DfmError as err:
            raise ApiError(400, str(err)) from err
        eos = server.tokenizer.eos_token_id
        out = []
        for i, ids in enumerate(choices):
            finish = "stop" if ids and ids[-1] == eos else "length"
            text = server.tokenizer.decode(ids[:-1] if finish == "stop" else ids, skip_special_tokens=False)
            out.append({"index": i, "text": text, "logprobs": None, "finish_reason": finish})
        prompt_tokens = sum(len(server.tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts)
        completion = sum(len(ids) for ids in choices)
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": prompt_tokens + completion,
        }
        return JSONResponse(
            {
                "id": f"cmpl-{uuid.uuid4().hex[:24]}",
                "object": "text_completion",
                "created": int(time.time()),
                "model": model,
                "choices": out,
                "usage": usage,
            }
        )

    @contextlib.asynccontextmanager
    async def lifespan(app):
        server.start()
        try:
            yield
        finally:
            server.stop()

    routes = [
        Route("/health", health),
        Route("/v1/models", models),
        Route("/metrics", metrics),
        Route("/v1/completions", completions, methods=["POST"]),
    ]
    return Starlette(routes=routes, lifespan=lifespan)


def serve(server: Server, host: str, port: int) -> None:
    """uvicorn in a thread and the engines on this, the main, thread (where torch runs its small
    per-token operations fastest); SIGTERM or SIGINT: uvicorn stops accepting, the requests in
    flight finish, then the engines stop."""
    import uvicorn

    if server.threaded:
        raise DfmError("serve() steps the engines itself: build the Server with threaded=False")
    config = uvicorn.Config(create_app(server), host=host, port=port, log_level="warning", timeout_graceful_shutdown=30)
    http = uvicorn.Server(config)
    thread = threading.Thread(target=http.run, name="dfm-http", daemon=True)
    thread.start()

    def shutdown(signum, frame) -> None:
        http.should_exit = True

    previous = {s: signal.signal(s, shutdown) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        engines = list(server.engines.values())
        if engines:
            run_engines(engines, stop=lambda: not thread.is_alive())
        while thread.is_alive():  # masked runs: the sampler runs in the request handlers
            thread.join(timeout=0.2)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        server.stop()
    if not http.started:
        raise DfmError(f"could not serve on {host}:{port} (is the port taken?): choose another --port")
