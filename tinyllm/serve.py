"""`python -m tinyllm.serve ckpt=PATH [host=127.0.0.1] [port=8000]`: an OpenAI-compatible
HTTP API and a chat page, so any chat UI, agent or script (the `openai` client with
`base_url="http://127.0.0.1:8000/v1"`) can talk to a tinyllm model.

    GET  /                       the chat page (tinyllm/static/chat.html: no build, no CDN)
    GET  /v1/models              the one model this server holds
    POST /v1/completions         text continuation  (stream true: server-sent events)
    POST /v1/chat/completions    messages through the checkpoint's chat template, ends at EOS

One model, one KV cache at a time: requests wait in a queue and a single worker thread
decodes them one after the other, so no request ever sees another's cache. A streaming client
that disconnects sets its request's cancel flag; the worker checks it every token and moves
on to the next request. Bad requests get a 4xx JSON body in OpenAI's error shape
({"error": {"message", "type", "param", "code"}}), never a traceback.
"""

from __future__ import annotations

import asyncio
import json
import os
import queue
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from tinyllm.errors import TinyLLMError

try:  # the `serve` extra; at module level because FastAPI reads the routes' annotations
    from fastapi import FastAPI, Request
    from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
except ImportError:  # reported by create_app, through the CLI's error handler
    FastAPI = Request = HTMLResponse = JSONResponse = StreamingResponse = None  # type: ignore

API_KEY_ENV = "TINYLLM_API_KEY"
Gone = Callable[[], Awaitable[bool]]  # "has the client disconnected?"


@dataclass
class Limits:
    """What one request may ask for (conf/serve.yaml's `serve:` block)."""

    max_tokens: int = 512  # the largest max_tokens a request may ask for
    default_max_tokens: int = 256  # when a request gives none
    max_prompt_tokens: int | None = None  # None: the model's block_size
    max_n: int = 4  # choices per request
    max_queue: int = 64  # requests waiting beyond this are refused with 503


class RequestError(Exception):
    """A client mistake: becomes a 4xx JSON error in OpenAI's shape."""

    def __init__(self, message: str, param: str | None = None, status: int = 400) -> None:
        super().__init__(message)
        self.message, self.param, self.status = message, param, status


# ------------------------------------------------------------------------------ one request


@dataclass
class Job:
    """One request for the worker: prompt ids and how to decode them, `n` times."""

    ids: list[int]
    max_tokens: int
    temperature: float
    top_p: float | None
    seed: int | None
    n: int
    stop: list[str]
    lead: str = ""  # a chat template's answer lead, stripped from the text
    emit: Callable[[tuple], None] = lambda event: None
    cancel: threading.Event = field(default_factory=threading.Event)


class Engine:
    """The model behind a queue: `submit(job)`; events come back through `job.emit`:
    ("delta", index, text), ("finish", index, reason, tokens), ("done", usage) or ("error", msg).
    """

    def __init__(self, model: torch.nn.Module, tokenizer: Any, chat_template: Any, limits: Limits):
        self.model, self.tokenizer, self.limits = model, tokenizer, limits
        self.chat_template = chat_template
        self.device = next(model.parameters()).device
        self.jobs: queue.Queue[Job] = queue.Queue(maxsize=limits.max_queue)
        self.history: list[tuple[str, int]] = []  # (finish reason, tokens), the last 1000 choices
        self.finished = 0  # choices finished since start (history is capped; this is not)
        self.busy = threading.Event()
        threading.Thread(target=self._work, name="tinyllm-decoder", daemon=True).start()

    def check_room(self) -> None:
        if self.jobs.full():
            raise RequestError(
                f"The server is busy ({self.limits.max_queue} requests waiting); retry later.",
                status=503,
            )

    def submit(self, job: Job) -> None:
        try:
            self.jobs.put_nowait(job)
        except queue.Full:
            raise RequestError(
                f"The server is busy ({self.limits.max_queue} requests waiting); retry later.",
                status=503,
            ) from None

    def _work(self) -> None:
        while True:
            job = self.jobs.get()
            if job.cancel.is_set():
                continue  # the client left while waiting
            self.busy.set()
            try:
                self._run(job)
            except Exception as e:  # never kill the worker; the client gets a clean error
                job.emit(("error", f"generation failed: {type(e).__name__}: {e}"))
            finally:
                self.busy.clear()

    def _run(self, job: Job) -> None:
        completion = 0
        for index in range(job.n):
            seed = None if job.seed is None else job.seed + index
            reason, tokens = self._decode(job, index, seed)
            self.history = [*self.history[-999:], (reason, tokens)]
            self.finished += 1
            completion += tokens
            job.emit(("finish", index, reason, tokens))
            if reason == "cancelled":
                return
        usage = {"prompt_tokens": len(job.ids), "completion_tokens": completion}
        job.emit(("done", {**usage, "total_tokens": len(job.ids) + completion}))

    def _decode(self, job: Job, index: int, seed: int | None) -> tuple[str, int]:
        """One choice, streamed as text pieces; returns (finish reason, tokens sampled)."""
        from tinyllm.sampling import TextStream, iter_generate_ids

        eos = self.tokenizer.eos_id
        text = TextStream(self.tokenizer, job.stop, job.lead)
        gen = None
        if seed is not None:
            gen = torch.Generator(device=self.device).manual_seed(seed)
        idx = torch.tensor([job.ids], dtype=torch.long, device=self.device)  # [1, T]
        steps = iter_generate_ids(
            self.model, idx, job.max_tokens, temperature=job.temperature, top_p=job.top_p,
            eos_id=eos, generator=gen,
        )  # fmt: skip
        n, reason = 0, "length"
        try:
            for nxt in steps:
                n += 1
                tok = int(nxt[0])
                if job.cancel.is_set():
                    return "cancelled", n
                if tok == eos:
                    reason = "stop"
                    break
                piece = text.push(tok)
                if piece:
                    job.emit(("delta", index, piece))
                if text.done:  # a stop string appeared
                    reason = "stop"
                    break
            tail = text.flush()
            if tail:
                job.emit(("delta", index, tail))
        finally:
            steps.close()
        return reason, n


# ------------------------------------------------------------------------------ requests


def _number(body: dict, key: str, default: Any, lo: float, hi: float, kind: type = float) -> Any:
    value = body.get(key)
    if value is None:
        return default
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    if kind is int:
        ok = ok and float(value).is_integer()
    if not ok or not lo <= value <= hi:
        what = "an integer" if kind is int else "a number"
        raise RequestError(f"`{key}` must be {what} in [{lo}, {hi}], got {value!r}.", key)
    return kind(value)


def _stops(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    if isinstance(stop, str):
        return [stop]
    if isinstance(stop, list) and len(stop) <= 4 and all(isinstance(s, str) for s in stop):
        return stop
    raise RequestError("`stop` must be a string or a list of at most 4 strings.", "stop")


def _sampling(body: dict, limits: Limits) -> dict[str, Any]:
    cap = limits.max_tokens
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    key = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    return dict(
        max_tokens=_number({key: max_tokens}, key, limits.default_max_tokens, 1, cap, int),
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(body, "top_p", None, 1e-9, 1.0),
        n=_number(body, "n", 1, 1, limits.max_n, int),
        seed=_number(body, "seed", None, -(2**63), 2**63 - 1, int),
        stop=_stops(body),
    )


def _content(m: dict, i: int) -> str:
    """A message's text: a string, or OpenAI's list of {"type": "text", "text": ...} parts."""
    c = m.get("content")
    if isinstance(c, str):
        return c
    if isinstance(c, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in c):
        return "".join(str(p.get("text", "")) for p in c)
    raise RequestError(
        f"messages[{i}].content must be a string or a list of text parts.", "messages"
    )


def _messages(body: dict) -> list[dict[str, str]]:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise RequestError("`messages` must be a non-empty list of {role, content}.", "messages")
    out = []
    for i, m in enumerate(msgs):
        role = m.get("role") if isinstance(m, dict) else None
        role = "system" if role == "developer" else role  # OpenAI's newer name for system
        if role not in ("system", "user", "assistant"):
            raise RequestError(
                f"messages[{i}].role {role!r} is not supported; use system, user or assistant.",
                "messages",
            )
        out.append({"role": role, "content": _content(m, i)})
    if out[-1]["role"] != "user":
        raise RequestError(
            "The last message must be the user's (the model answers it).", "messages"
        )
    return out


class Server:
    """Turns request bodies into Jobs (checked against the limits) and events into responses."""

    def __init__(self, engine: Engine, model_name: str) -> None:
        self.engine, self.model_name = engine, model_name
        block = engine.model.config.block_size
        self.max_prompt = engine.limits.max_prompt_tokens or block

    def _check_prompt(self, ids: list[int]) -> None:
        if len(ids) > self.max_prompt:
            raise RequestError(
                f"The prompt has {len(ids)} tokens; this server accepts at most "
                f"{self.max_prompt} (serve.max_prompt_tokens). Shorten it.",
                "prompt",
            )

    def completion_job(self, body: dict) -> Job:
        prompt = body.get("prompt", "")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise RequestError("`prompt` must be a string (one prompt per request).", "prompt")
        tok = self.engine.tokenizer
        ids = tok.encode(prompt) if prompt else []
        if not ids:  # as tinyllm.generate: an empty prompt starts a document
            start = tok.bos_id if tok.bos_id is not None else tok.eos_id
            if start is None:
                raise RequestError("The prompt is empty and the model has no BOS token.", "prompt")
            ids = [int(start)]
        self._check_prompt(ids)
        return Job(ids=ids, **_sampling(body, self.engine.limits))

    def chat_job(self, body: dict) -> Job:
        from tinyllm.chat import ChatTemplate

        messages = _messages(body)
        tmpl = ChatTemplate.coerce(self.engine.chat_template)
        try:
            ids = tmpl.encode_prompt(self.engine.tokenizer, messages)
        except TinyLLMError as e:
            raise RequestError(str(e), "messages") from None
        self._check_prompt(ids)
        s = _sampling(body, self.engine.limits)
        stops = [*s.pop("stop"), *([tmpl.assistant_suffix] if tmpl.assistant_suffix else [])]
        return Job(ids=ids, stop=stops, lead=tmpl.answer_lead, **s)

    async def events(self, job: Job, gone: Gone) -> AsyncIterator[tuple]:
        """The job's events as they come. Leaving early cancels the job, and so does the client
        going away: `gone()` (the request's is_disconnected) is asked every quarter second,
        since a write to a closed connection need not fail."""
        loop = asyncio.get_running_loop()
        inbox: asyncio.Queue[tuple] = asyncio.Queue()
        job.emit = lambda ev: loop.call_soon_threadsafe(inbox.put_nowait, ev)
        self.engine.submit(job)
        checked = loop.time()
        try:
            while True:
                if loop.time() - checked > 0.25:
                    checked = loop.time()
                    if await gone():
                        return
                try:
                    ev = await asyncio.wait_for(inbox.get(), timeout=0.25)
                except asyncio.TimeoutError:
                    continue
                yield ev
                if ev[0] in ("done", "error"):
                    return
        finally:
            job.cancel.set()  # finished, or the client went away: the worker stops at once


# ------------------------------------------------------------------------------ responses


def _error_body(message: str, param: str | None = None, kind: str = "invalid_request_error"):
    return {"error": {"message": message, "type": kind, "param": param, "code": None}}


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def _collect(server: Server, job: Job, chat: bool, gone: Gone) -> dict[str, Any]:
    texts, reasons, usage = [""] * job.n, [None] * job.n, {}
    async for ev in server.events(job, gone):
        if ev[0] == "delta":
            texts[ev[1]] += ev[2]
        elif ev[0] == "finish":
            reasons[ev[1]] = ev[2]
        elif ev[0] == "done":
            usage = ev[1]
        elif ev[0] == "error":
            raise RuntimeError(ev[1])
    if chat:
        choices = [
            {"index": i, "message": {"role": "assistant", "content": t}, "finish_reason": r}
            for i, (t, r) in enumerate(zip(texts, reasons))
        ]
    else:
        choices = [
            {"index": i, "text": t, "logprobs": None, "finish_reason": r}
            for i, (t, r) in enumerate(zip(texts, reasons))
        ]
    return {"choices": choices, "usage": usage}


def _chunk(head: dict, chat: bool, index: int, text: str | None, reason: str | None) -> str:
    """One streamed event; for chat, text=None with reason=None opens the choice (the role)."""
    if not chat:
        choice = {"index": index, "text": text or "", "logprobs": None, "finish_reason": reason}
    elif text is None and reason is None:
        choice = {"index": index, "delta": {"role": "assistant", "content": ""}}
    else:
        delta = {} if text is None else {"content": text}
        choice = {"index": index, "delta": delta, "finish_reason": reason}
    return _sse({**head, "choices": [choice]})


async def _stream(
    server: Server, job: Job, head: dict, chat: bool, gone: Gone
) -> AsyncIterator[str]:
    if chat:  # OpenAI opens every choice with the role
        for i in range(job.n):
            yield _chunk(head, chat, i, None, None)
    async for ev in server.events(job, gone):
        if ev[0] == "delta":
            yield _chunk(head, chat, ev[1], ev[2], None)
        elif ev[0] == "finish":
            yield _chunk(head, chat, ev[1], None, ev[2])
        elif ev[0] == "error":
            yield _sse(_error_body(ev[1], kind="server_error"))
    yield "data: [DONE]\n\n"


def _error(status: int, message: str, param: str | None = None) -> Any:
    kind = "invalid_request_error" if status < 500 else "server_error"
    if status == 401:
        kind = "authentication_error"
    return JSONResponse(_error_body(message, param, kind), status_code=status)


def _add_error_handlers(app: Any, api_key: str | None) -> None:
    """The API key check, and every error as OpenAI's JSON (never a traceback)."""

    @app.middleware("http")
    async def check_key(request: Request, call_next):  # noqa: ANN001, ANN202
        given = request.headers.get("authorization", "")
        if api_key and request.url.path.startswith("/v1/") and given != f"Bearer {api_key}":
            return _error(401, "Missing or wrong API key (send Authorization: Bearer KEY).")
        return await call_next(request)

    @app.exception_handler(RequestError)
    async def bad_request(request: Request, exc: RequestError) -> JSONResponse:
        return _error(exc.status, exc.message, exc.param)

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception) -> JSONResponse:
        return _error(500, f"Internal error ({type(exc).__name__}); see the server's log.")

    @app.exception_handler(404)
    async def not_found(request: Request, exc: Exception) -> JSONResponse:
        return _error(404, f"No route {request.method} {request.url.path}.")

    @app.exception_handler(405)
    async def not_allowed(request: Request, exc: Exception) -> JSONResponse:
        return _error(405, f"Method {request.method} is not allowed on {request.url.path}.")


async def _body(request: Any) -> dict:
    try:
        body = json.loads(await request.body() or b"null")
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RequestError(f"The request body is not valid JSON ({e}).") from None
    if not isinstance(body, dict):
        raise RequestError("The request body must be a JSON object.")
    if not isinstance(body.get("stream", False), bool):
        raise RequestError("`stream` must be true or false.", "stream")
    return body


def create_app(engine: Engine, model_name: str = "tinyllm", api_key: str | None = None) -> Any:
    """The FastAPI app: routes, the API key check and OpenAI-shaped errors."""
    if FastAPI is None:
        raise TinyLLMError(
            "tinyllm.serve needs FastAPI and uvicorn: pip install 'tinyllm[serve]' "
            "(or pip install fastapi uvicorn)."
        )
    app = FastAPI(title="tinyllm", docs_url=None, redoc_url=None, openapi_url=None)
    server = Server(engine, model_name)
    created = int(time.time())

    _add_error_handlers(app, api_key)

    @app.get("/", response_class=HTMLResponse)
    async def page() -> HTMLResponse:
        from importlib.resources import files

        return HTMLResponse(files("tinyllm.static").joinpath("chat.html").read_text("utf-8"))

    @app.get("/v1/models")
    async def models() -> dict:
        card = {"id": model_name, "object": "model", "created": created, "owned_by": "tinyllm"}
        return {"object": "list", "data": [card]}

    async def respond(request: Request, chat: bool):  # noqa: ANN202
        body = await _body(request)
        job = server.chat_job(body) if chat else server.completion_job(body)
        kind = "chat.completion" if chat else "text_completion"
        prefix = "chatcmpl" if chat else "cmpl"
        head = {
            "id": f"{prefix}-{uuid.uuid4().hex[:24]}",
            "created": int(time.time()),
            "model": model_name,
        }
        if body.get("stream"):
            engine.check_room()  # refuse now: once the stream starts, the status is 200
            stream_head = {**head, "object": kind + (".chunk" if chat else "")}
            return StreamingResponse(
                _stream(server, job, stream_head, chat, request.is_disconnected),
                media_type="text/event-stream",
            )
        return {
            **head,
            "object": kind,
            **await _collect(server, job, chat, request.is_disconnected),
        }

    @app.post("/v1/completions")
    async def completions(request: Request):  # noqa: ANN202
        return await respond(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):  # noqa: ANN202
        return await respond(request, chat=True)

    app.state.engine = engine
    return app


# ------------------------------------------------------------------------------ CLI


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, or a TinyLLMError saying why not (port in use, bad host)."""
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise TinyLLMError(
            f"Cannot listen on {host}:{port} ({e.strerror or e}). Another program may be using "
            f"the port: pick another with `port={port + 1}`, or stop the other server."
        ) from None
    except (socket.gaierror, UnicodeError, OverflowError) as e:
        raise TinyLLMError(
            f"host={host!r} port={port}: not an address to listen on ({e})."
        ) from None
    return sock


class BackgroundServer:
    """`with BackgroundServer(app) as s:` serves `app` on 127.0.0.1:<free port> (s.url) from a
    daemon thread of this process: for tests, benchmarks and notebooks."""

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0) -> None:
        import uvicorn

        self.sock = bind(host, port)
        self.port = self.sock.getsockname()[1]
        self.url = f"http://{host}:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True
        )

    def __enter__(self) -> BackgroundServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError(f"the server on {self.url} did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()


def limits_from(cfg: Any) -> Limits:
    names = set(Limits.__dataclass_fields__)
    d = {k: v for k, v in dict(cfg or {}).items() if k in names}
    limits = Limits(**d)
    for k in ("max_tokens", "default_max_tokens", "max_n", "max_queue"):
        v = getattr(limits, k)
        if not isinstance(v, int) or v < 1:
            raise TinyLLMError(f"serve.{k}={v!r}: use a whole number >= 1.")
    if limits.default_max_tokens > limits.max_tokens:
        raise TinyLLMError("serve.default_max_tokens is larger than serve.max_tokens.")
    return limits


def run(cfg: Any) -> None:
    """Load the checkpoint, bind the port (both fail with a clear error), then serve."""
    import uvicorn

    from tinyllm.generate import load_for_generation

    serve_cfg = dict(cfg.get("serve") or {})
    limits = limits_from(serve_cfg)
    host, port = str(cfg.get("host", "127.0.0.1")), cfg.get("port", 8000)
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port < 65536:
        raise TinyLLMError(f"port={port!r}: use a whole number in [0, 65535], e.g. port=8000.")
    model, tokenizer, chat = load_for_generation(
        cfg.get("ckpt"), str(serve_cfg.get("device", "auto")), str(serve_cfg.get("dtype", "fp32"))
    )
    sock = bind(host, port)
    api_key = serve_cfg.get("api_key") or os.environ.get(API_KEY_ENV) or None
    name = serve_cfg.get("model_name") or "tinyllm"
    app = create_app(Engine(model, tokenizer, chat, limits), name, api_key)
    url = f"http://{host}:{sock.getsockname()[1]}"
    print(
        f"tinyllm.serve: {name} ({model.num_params():,} parameters) at {url}/ (chat page) and "
        f"{url}/v1 (OpenAI API){'; API key required' if api_key else ''}. Ctrl-C stops.",
        flush=True,
    )
    uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[sock])


def _hydra_main() -> None:
    import hydra
    from omegaconf import DictConfig, OmegaConf

    @hydra.main(config_path="../conf", config_name="serve", version_base="1.3")
    def main(cfg: DictConfig) -> None:
        from tinyllm.errors import exit_on_user_error

        with exit_on_user_error():
            run(OmegaConf.to_container(cfg, resolve=True))

    main()


if __name__ == "__main__":
    _hydra_main()
