"""The OpenAI-compatible server, talked to by the official `openai` client over a real socket:
greedy output equals tinyllm.generate's, streaming gives the same text, 16 concurrent streams
all finish correctly, a disconnect frees the slot, and bad requests get 4xx JSON errors."""

from __future__ import annotations

import http.client
import json
import subprocess
import sys
import threading
import time

import pytest
from serve_utils import CHAT_TEMPLATE, LiveServer, tiny_model, tiny_tokenizer

from tinyllm.errors import TinyLLMError
from tinyllm.sampling import generate

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from tinyllm.serve import Engine, Limits, create_app  # noqa: E402


@pytest.fixture(scope="module")
def parts():
    tok = tiny_tokenizer()
    return tiny_model(tok.vocab_size), tok


@pytest.fixture(scope="module")
def live(parts):
    model, tok = parts
    engine = Engine(model, tok, CHAT_TEMPLATE, Limits(max_tokens=600, max_prompt_tokens=48))
    with LiveServer(create_app(engine, "tiny")) as server:
        server.engine = engine
        yield server


@pytest.fixture(scope="module")
def client(live):
    return openai.OpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0, timeout=60)


PROMPTS = ["ROMEO: But", "Question: Who", "héllo", "", "What light"]


def test_models(client) -> None:
    assert [m.id for m in client.models.list().data] == ["tiny"]


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_completion_equals_generate(client, parts, prompt: str) -> None:
    model, tok = parts
    expected = generate(model, tok, prompt, max_new_tokens=30, temperature=0)
    r = client.completions.create(model="tiny", prompt=prompt, max_tokens=30, temperature=0)
    assert r.choices[0].text == expected
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens == max(1, len(tok.encode(prompt)))
    stream = client.completions.create(
        model="tiny", prompt=prompt, max_tokens=30, temperature=0, stream=True
    )
    pieces = [c.choices[0].text for c in stream]
    assert "".join(pieces) == expected


def test_chat_uses_the_template_and_stops_at_eos(client, parts) -> None:
    model, tok = parts
    for question in ("Who are you?", "What is two plus two?", "ünïcode 😀"):
        messages = [{"role": "user", "content": question}]
        expected = generate(
            model, tok, messages, max_new_tokens=40, temperature=0, chat_template=CHAT_TEMPLATE
        )
        r = client.chat.completions.create(
            model="tiny", messages=messages, max_tokens=40, temperature=0
        )
        assert r.choices[0].message.content == expected
        assert r.choices[0].message.role == "assistant"
        stream = client.chat.completions.create(
            model="tiny", messages=messages, max_tokens=40, temperature=0, stream=True
        )
        assert "".join(c.choices[0].delta.content or "" for c in stream) == expected
    # A conversation with history and a system message, as the template renders it.
    history = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Who are you?"},
    ]
    expected = generate(model, tok, history, 40, temperature=0, chat_template=CHAT_TEMPLATE)
    r = client.chat.completions.create(model="tiny", messages=history, max_tokens=40, temperature=0)
    assert r.choices[0].message.content == expected


class EosAs:
    """The tokenizer with another token playing EOS (to stop a random model on cue)."""

    def __init__(self, tok, eos_id: int) -> None:
        self._tok, self.eos_id = tok, eos_id

    def __getattr__(self, name: str):
        return getattr(self._tok, name)


def test_chat_stops_at_eos(parts) -> None:
    """EOS ends the answer (not in the text), finish_reason 'stop'; max_tokens gives 'length'."""
    import torch

    from tinyllm.chat import ChatTemplate
    from tinyllm.sampling import generate_ids

    model, tok = parts
    messages = [{"role": "user", "content": "Who are you?"}]
    ids = ChatTemplate.coerce(CHAT_TEMPLATE).encode_prompt(tok, messages)
    greedy = generate_ids(model, torch.tensor(ids), 12, temperature=0)[0]
    eos_tok = EosAs(tok, greedy[6])
    k = greedy.index(greedy[6]) + 1  # tokens sampled up to and including the first EOS
    engine = Engine(model, eos_tok, CHAT_TEMPLATE, Limits())
    with LiveServer(create_app(engine, "tiny")) as server:
        c = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
        r = c.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0)
        expected = generate(
            model, eos_tok, messages, 12, temperature=0, chat_template=CHAT_TEMPLATE
        )  # fmt: skip
        assert r.choices[0].message.content == expected
        assert r.choices[0].finish_reason == "stop" and r.usage.completion_tokens == k
        r = c.chat.completions.create(
            model="tiny", messages=messages, max_tokens=k - 1, temperature=0
        )  # fmt: skip
        assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == k - 1


def test_sampling_options_seed_n_and_stop(client, parts) -> None:
    model, tok = parts
    args = dict(model="tiny", prompt="ROMEO:", max_tokens=25, temperature=0.9, top_p=0.95)
    a = client.completions.create(n=3, seed=7, **args)
    b = client.completions.create(n=3, seed=7, **args)
    texts = [c.text for c in a.choices]
    assert texts == [c.text for c in b.choices]  # reproducible with a seed
    assert [c.index for c in a.choices] == [0, 1, 2]
    for i, text in enumerate(texts):  # choice i samples with seed + i, as generate(seed=) does
        assert text == generate(
            model, tok, "ROMEO:", 25, temperature=0.9, top_p=0.95, seed=7 + i
        )  # fmt: skip
    full = generate(model, tok, "ROMEO:", 40, temperature=0)
    stop = full[5:7]
    r = client.completions.create(
        model="tiny", prompt="ROMEO:", max_tokens=40, temperature=0, stop=[stop]
    )
    assert r.choices[0].text == full[: full.index(stop)] and r.choices[0].finish_reason == "stop"


def test_sixteen_concurrent_streams(live, parts) -> None:
    model, tok = parts
    prompts = [f"{PROMPTS[i % len(PROMPTS)]} {i}" for i in range(16)]
    expected = [generate(model, tok, p, max_new_tokens=24, temperature=0) for p in prompts]
    results: dict[int, str] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(16)

    def one(i: int) -> None:
        try:
            c = openai.OpenAI(base_url=live.url + "/v1", api_key="x", max_retries=0, timeout=120)
            start.wait()
            stream = c.completions.create(
                model="tiny", prompt=prompts[i], max_tokens=24, temperature=0, stream=True
            )
            results[i] = "".join(chunk.choices[0].text for chunk in stream)
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=180)
    assert not errors, errors
    assert [results.get(i) for i in range(16)] == expected


def raw(live, method: str, path: str, body: bytes | None = None, headers=None):
    conn = http.client.HTTPConnection("127.0.0.1", live.port, timeout=30)
    conn.request(method, path, body=body, headers=headers or {"Content-Type": "application/json"})
    r = conn.getresponse()
    data = r.read()
    conn.close()
    return r.status, json.loads(data)


def test_disconnect_mid_stream_frees_the_slot(parts) -> None:
    """A client leaves mid-stream: its job is cancelled at once (not decoded to max_tokens)
    and the next request is served. The tokenizer has no EOS here, so nothing else can end
    the 100k-token job."""
    model, tok = parts
    engine = Engine(model, EosAs(tok, None), None, Limits(max_tokens=100_000))
    body = json.dumps({"model": "tiny", "prompt": "ROMEO", "max_tokens": 100_000, "stream": True})
    with LiveServer(create_app(engine, "tiny")) as server:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
        r = conn.getresponse()
        assert r.status == 200
        r.fp.readline()  # the first event arrived: decoding is under way
        assert engine.finished == 0
        conn.sock.close()  # the client goes away mid-stream
        conn.close()
        deadline = time.monotonic() + 30
        while engine.finished == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert engine.history == [("cancelled", engine.history[0][1])]
        assert engine.history[0][1] < 100_000
        c = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
        r2 = c.completions.create(model="tiny", prompt="x", max_tokens=3, temperature=0)
        assert r2.choices[0].finish_reason == "length"  # the slot is free: served at once


@pytest.mark.parametrize(
    "path, body, param, words",
    [
        ("/v1/completions", {"prompt": "x", "max_tokens": -1}, "max_tokens", "max_tokens"),
        ("/v1/completions", {"prompt": "x", "max_tokens": 10_000}, "max_tokens", "[1, 600]"),
        ("/v1/completions", {"prompt": "x", "temperature": 2.5}, "temperature", "[0.0, 2.0]"),
        ("/v1/completions", {"prompt": "x", "top_p": 0}, "top_p", "top_p"),
        ("/v1/completions", {"prompt": "x", "n": 50}, "n", "`n`"),
        ("/v1/completions", {"prompt": "x", "stop": 3}, "stop", "stop"),
        ("/v1/completions", {"prompt": "ROMEO " * 60}, "prompt", "at most 48"),
        ("/v1/completions", {"prompt": {"a": 1}}, "prompt", "string"),
        ("/v1/chat/completions", {"messages": []}, "messages", "non-empty"),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "tool", "content": "x"}]},
            "messages",
            "'tool' is not supported",
        ),
        (
            "/v1/chat/completions",
            {
                "messages": [
                    {"role": "user", "content": "hi"},
                    {"role": "assistant", "content": "a"},
                ]
            },
            "messages",
            "last message",
        ),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": 5}]},
            "messages",
            "content",
        ),
    ],
)
def test_bad_requests_get_openai_errors(live, path, body, param, words) -> None:
    status, data = raw(live, "POST", path, json.dumps({"model": "tiny", **body}).encode())
    assert status == 400, data
    err = data["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == param
    assert words in err["message"], err["message"]


def test_malformed_http(live, client) -> None:
    status, data = raw(live, "POST", "/v1/completions", b"{not json")
    assert status == 400 and "not valid JSON" in data["error"]["message"]
    status, data = raw(live, "POST", "/v1/completions", b"[1, 2]")
    assert status == 400 and "JSON object" in data["error"]["message"]
    status, data = raw(live, "GET", "/v1/nothing")
    assert status == 404 and "error" in data
    status, data = raw(live, "GET", "/v1/completions")
    assert status == 405 and "error" in data
    with pytest.raises(openai.BadRequestError) as e:  # the client sees OpenAI's error type
        client.completions.create(model="tiny", prompt="x", max_tokens=-5)
    assert e.value.status_code == 400


def test_chat_page(live) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", live.port, timeout=30)
    conn.request("GET", "/")
    r = conn.getresponse()
    html = r.read().decode()
    assert r.status == 200 and "text/html" in r.getheader("content-type")
    assert 'id="new-chat"' in html and "/v1/chat/completions" in html
    assert "http://" not in html and "https://" not in html  # no external assets


def test_api_key(parts) -> None:
    model, tok = parts
    engine = Engine(model, tok, None, Limits())
    with LiveServer(create_app(engine, "tiny", api_key="s3cret")) as server:
        bad = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
        good = openai.OpenAI(base_url=server.url + "/v1", api_key="s3cret", max_retries=0)
        assert good.models.list().data[0].id == "tiny"
        # no template in the checkpoint: chat uses the default one
        r = good.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=5
        )
        assert r.choices[0].message.role == "assistant"


def test_cli_errors_in_process(parts, tmp_path) -> None:
    """Missing checkpoint, port in use, bad limits: one-paragraph TinyLLMErrors (exit 2)."""
    from tinyllm.checkpoint import save_checkpoint
    from tinyllm.serve import bind, run

    model, tok = parts
    save_checkpoint(tmp_path / "m.ckpt", model, tok)
    with pytest.raises(TinyLLMError, match="not found"):
        run({"ckpt": str(tmp_path / "nope.ckpt"), "port": 0})
    busy = bind("127.0.0.1", 0)
    busy.listen()
    port = busy.getsockname()[1]
    try:
        with pytest.raises(TinyLLMError, match=f"Cannot listen on 127.0.0.1:{port}"):
            run({"ckpt": str(tmp_path / "m.ckpt"), "port": port})
    finally:
        busy.close()
    with pytest.raises(TinyLLMError, match="serve.max_tokens"):
        run({"ckpt": str(tmp_path / "m.ckpt"), "serve": {"max_tokens": -3}})
    with pytest.raises(TinyLLMError, match="port="):
        run({"ckpt": str(tmp_path / "m.ckpt"), "port": 70000})


@pytest.mark.slow
def test_cli_server_matches_generate_cli(parts, tmp_path) -> None:
    """`python -m tinyllm.serve` in its own process: its greedy completion equals the text
    `python -m tinyllm.generate` prints; a second server on the same port exits 2."""
    from tinyllm.checkpoint import save_checkpoint
    from tinyllm.serve import bind

    model, tok = parts
    ckpt = tmp_path / "m.ckpt"
    save_checkpoint(ckpt, model, tok)
    probe = bind("127.0.0.1", 0)
    port = probe.getsockname()[1]
    probe.close()
    cmd = [sys.executable, "-m", "tinyllm.serve", f"ckpt={ckpt}", f"port={port}"]
    server = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0)
        deadline = time.monotonic() + 180
        while True:
            try:
                client.models.list()
                break
            except openai.APIConnectionError:
                assert server.poll() is None, server.stderr.read().decode()
                assert time.monotonic() < deadline
                time.sleep(0.5)
        r = client.completions.create(
            model="tinyllm", prompt="ROMEO:", max_tokens=20, temperature=0
        )
        gen = subprocess.run(
            [sys.executable, "-m", "tinyllm.generate", f"ckpt={ckpt}", "prompt=ROMEO:",
             "max_new_tokens=20", "temperature=0"],
            capture_output=True, text=True, cwd=tmp_path, timeout=300,
        )  # fmt: skip
        assert gen.returncode == 0, gen.stderr
        assert gen.stdout == "ROMEO:" + r.choices[0].text + "\n"
        again = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=300)
        assert again.returncode == 2 and "Cannot listen" in again.stderr
        assert "Traceback" not in again.stderr
    finally:
        server.terminate()
        server.wait(timeout=30)
