"""Generation on the real GPT: cache == recompute, text API, streaming, chat, and the CLI.

Everything runs on a ~20k-parameter model and a 300-token tokenizer trained in milliseconds;
the few subprocess tests check what only a real process shows (exit codes, no traceback).
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from tinyllm.checkpoint import save_checkpoint
from tinyllm.errors import TinyLLMError
from tinyllm.model import GPT, ModelConfig
from tinyllm.sampling import TextStream, generate, generate_ids, generate_stream
from tinyllm.tokenizer import BPETokenizer

REPO = Path(__file__).resolve().parents[1]
TEXT = (
    "ROMEO: But soft, what light through yonder window breaks?\n"
    "JULIET: O Romeo, Romeo, wherefore art thou Romeo? 😀 héllo wörld\n"
) * 20


@pytest.fixture(scope="module")
def tok() -> BPETokenizer:
    return BPETokenizer.train(TEXT, 300)


def tiny_gpt(tok: BPETokenizer, seed: int = 0, **kw) -> GPT:
    torch.manual_seed(seed)
    cfg = dict(vocab_size=tok.vocab_size, block_size=32, n_layer=2, n_head=2, n_embd=32)
    cfg.update(kw)
    return GPT(ModelConfig(**cfg)).eval()


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory: pytest.TempPathFactory, tok: BPETokenizer) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("ckpts")
    model = tiny_gpt(tok, pos="rope", block_size=64)
    paths = {"plain": d / "tiny.ckpt", "chat": d / "chat.ckpt", "junk": d / "junk.ckpt"}
    save_checkpoint(paths["plain"], model, tok)
    save_checkpoint(paths["chat"], model, tok, chat_template={"user_prefix": "Q: "})
    torch.save({"weights": torch.zeros(3)}, paths["junk"])
    return paths


# ---- the loop on the real model ------------------------------------------------------------


@pytest.mark.parametrize(
    "kw",
    [
        dict(pos="learned"),
        dict(pos="sinusoidal"),
        dict(pos="rope", norm="rmsnorm", activation="swiglu", bias=False),
        dict(pos="alibi", n_kv_head=1),
        dict(pos="none", n_head=4, n_kv_head=2),
    ],
    ids=lambda kw: kw["pos"],
)
def test_cached_greedy_equals_uncached(tok: BPETokenizer, kw: dict) -> None:
    model = tiny_gpt(tok, block_size=16, **kw)
    prompt = torch.tensor(tok.encode("ROMEO: But"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the window slides (block_size 16, 40 new tokens)
        a = generate_ids(model, prompt, 40, temperature=0)
        b = generate_ids(model, prompt, 40, temperature=0, use_cache=False)
    assert a == b and len(a[0]) == 40


def test_batched_samples_match_single_rows(tok: BPETokenizer) -> None:
    model = tiny_gpt(tok)
    prompt = torch.tensor(tok.encode("JULIET:"))
    single = generate_ids(model, prompt, 12, temperature=0)
    batch = generate_ids(model, prompt, 12, temperature=0, num_samples=3)
    assert batch == single * 3
    g = torch.Generator().manual_seed(0)
    sampled = generate_ids(model, prompt, 12, temperature=1.5, num_samples=4, generator=g)
    assert len({tuple(r) for r in sampled}) > 1


# ---- the text API --------------------------------------------------------------------------


def test_seed_reproducible_and_stream_equals_generate(tok: BPETokenizer) -> None:
    model = tiny_gpt(tok)
    kw = dict(max_new_tokens=25, temperature=1.0, top_k=50, top_p=0.9)
    a = generate(model, tok, "ROMEO:", seed=0, **kw)
    assert a == generate(model, tok, "ROMEO:", seed=0, **kw)
    assert a != generate(model, tok, "ROMEO:", seed=1, **kw)
    assert "".join(generate_stream(model, tok, "ROMEO:", seed=0, **kw)) == a
    full = generate(model, tok, "ROMEO:", seed=0, include_prompt=True, **kw)
    assert full == "ROMEO:" + a
    many = generate(model, tok, "ROMEO:", seed=0, num_samples=3, **kw)
    assert isinstance(many, list) and len(many) == 3


def test_empty_prompt_starts_from_bos(tok: BPETokenizer) -> None:
    model = tiny_gpt(tok)
    stats: dict = {}
    text = generate(model, tok, "", max_new_tokens=5, temperature=0, stats=stats)
    assert isinstance(text, str) and stats == {"prompt_tokens": 1, "new_tokens": 5}


class EosAs:
    """The tokenizer with another token playing EOS (to stop a random model on cue)."""

    def __init__(self, tok: BPETokenizer, eos_id: int) -> None:
        self._tok, self.eos_id = tok, eos_id

    def __getattr__(self, name: str):
        return getattr(self._tok, name)


def test_eos_and_stop_strings_end_the_text(tok: BPETokenizer) -> None:
    model = tiny_gpt(tok)
    prompt = tok.encode("ROMEO:")
    ids = generate_ids(model, torch.tensor(prompt), 20, temperature=0)[0]
    k = 6
    eos = ids[k]
    fake = EosAs(tok, eos)
    stats: dict = {}
    out = generate(model, fake, "ROMEO:", 20, temperature=0, stats=stats)
    assert out == tok.decode(ids[: ids.index(eos)])
    assert stats["new_tokens"] == ids.index(eos) + 1  # the loop ended at EOS
    # a stop string in the middle of the text: cut before it, in the stream and in batches
    full = generate(model, tok, "ROMEO:", 20, temperature=0, stop_at_eos=False)
    stop = full[5:8]
    cut = full[: full.index(stop)]
    assert generate(model, tok, "ROMEO:", 20, temperature=0, stop=stop) == cut
    assert "".join(generate_stream(model, tok, "ROMEO:", 20, temperature=0, stop=[stop])) == cut
    assert generate(model, tok, "ROMEO:", 20, temperature=0, stop=stop, num_samples=2) == [cut] * 2


class ByteTok:
    """One token per byte: multi-byte characters always arrive split across tokens."""

    def token_bytes(self, i: int) -> bytes:
        return bytes([i])


def test_text_stream_utf8_and_stop_strings() -> None:
    text = "héllo 😀 wörld END tail"
    ids = list(text.encode("utf-8"))
    s = TextStream(ByteTok(), stop=["END"])
    pieces = [s.push(i) for i in ids]
    assert all("\ufffd" not in p for p in pieces)  # never half a character
    assert "".join(pieces) + s.flush() == "héllo 😀 wörld "
    assert s.done
    # a held-back prefix of a stop string that turns out not to be one is released
    s = TextStream(ByteTok(), stop=["ENDX"], lead=" ")
    out = "".join(s.push(i) for i in b" a END b") + s.flush()
    assert out == "a END b"
    # a character cut off at the very end decodes as U+FFFD, as tokenizer.decode does
    s = TextStream(ByteTok())
    assert "".join(s.push(i) for i in "a😀".encode()[:3]) + s.flush() == "a\ufffd"


def test_chat_template_prompt_and_eos(tok: BPETokenizer) -> None:
    from tinyllm.chat import ChatTemplate

    model = tiny_gpt(tok)
    tmpl = {"user_prefix": "Q: "}
    want = ChatTemplate.coerce(tmpl).encode_prompt(tok, "Who are you?")
    stats: dict = {}
    generate(model, tok, "Who are you?", 4, temperature=0, chat_template=tmpl, stats=stats)
    assert stats["prompt_tokens"] == len(want)
    ids = generate_ids(model, torch.tensor(want), 10, temperature=0)[0]
    out = generate(model, EosAs(tok, ids[3]), "Who are you?", 10, temperature=0, chat_template=tmpl)
    answer = tok.decode(ids[: ids.index(ids[3])])
    assert out == (answer[1:] if answer.startswith(" ") else answer)  # the lead is stripped
    with pytest.raises(TinyLLMError, match="chat template"):
        generate(model, tok, [{"role": "user", "content": "hi"}], 3)


def test_bf16_and_bad_values(tok: BPETokenizer) -> None:
    model = tiny_gpt(tok).to(torch.bfloat16)
    assert isinstance(generate(model, tok, "ROMEO:", 5, temperature=0.7, seed=0), str)
    for bad in (dict(temperature=-1.0), dict(top_p=0.0), dict(min_p=2.0), dict(top_k=-3)):
        with pytest.raises(TinyLLMError):
            generate(model, tok, "ROMEO:", 5, **bad)


# ---- the CLI in-process (fast): options, errors, the REPL ----------------------------------


def cli_cfg(*overrides: str):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(config_name="generate", overrides=list(overrides))


def run_cli(*overrides: str) -> None:
    from tinyllm.generate import run

    run(cli_cfg(*overrides))


def test_cli_prints_prompt_and_continuation(ckpts, capsys, tmp_path: Path) -> None:
    run_cli(f"ckpt={ckpts['plain']}", "prompt=ROMEO:", "max_new_tokens=8", "seed=0")
    out, err = capsys.readouterr()
    assert out.startswith("ROMEO:") and "tokens/s" in err
    pf = tmp_path / "prompt.txt"
    pf.write_text("JULIET: O Romeo")
    run_cli(f"ckpt={ckpts['plain']}", f"prompt_file={pf}", "max_new_tokens=4", "num_samples=2")
    out, err = capsys.readouterr()
    assert out.count("JULIET: O Romeo") == 2 and "[generated" in err
    run_cli(f"ckpt={ckpts['chat']}", "prompt=Who are you?", "max_new_tokens=4")
    assert capsys.readouterr().out.startswith("Q: Who are you?\nAnswer: ")


def test_cli_ckpt_latest(ckpts, capsys, tmp_path: Path, monkeypatch) -> None:
    run_dir = tmp_path / "outputs" / "2026-01-01" / "00-00-00" / "checkpoints"
    run_dir.mkdir(parents=True)
    (run_dir / "last.ckpt").write_bytes(ckpts["plain"].read_bytes())
    monkeypatch.chdir(tmp_path)
    run_cli("ckpt=latest", "prompt=ROMEO:", "max_new_tokens=2")
    assert capsys.readouterr().out.startswith("ROMEO:")


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["ckpt=/nonexistent/x.ckpt"], "not found"),
        (["ckpt=JUNK"], "not a tinyllm checkpoint"),
        (["ckpt=GARBAGE"], "Could not read"),
        ([], "No checkpoint given"),
        (["ckpt=PLAIN", "temperature=-1"], "temperature"),
        (["ckpt=PLAIN", "top_p=1.5"], "top_p"),
        (["ckpt=PLAIN", "top_k=-1"], "top_k"),
        (["ckpt=PLAIN", "min_p=2"], "min_p"),
        (["ckpt=PLAIN", "repetition_penalty=0"], "repetition_penalty"),
        (["ckpt=PLAIN", "top_k=abc"], "top_k"),
        (["ckpt=PLAIN", "dtype=int8"], "dtype"),
        (["ckpt=PLAIN", "prompt_file=/nonexistent.txt"], "prompt_file"),
    ],
)
def test_cli_errors(ckpts, tmp_path: Path, overrides: list[str], message: str) -> None:
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"not a checkpoint at all")
    subs = {"JUNK": str(ckpts["junk"]), "GARBAGE": str(garbage), "PLAIN": str(ckpts["plain"])}
    overrides = [
        o.split("=")[0] + "=" + subs.get(o.split("=")[1], o.split("=")[1]) for o in overrides
    ]
    with pytest.raises(TinyLLMError, match=message):
        run_cli(*overrides)


def test_cli_repl_chat_and_ctrl_c(ckpts, capsys, monkeypatch) -> None:
    import tinyllm.generate as gen

    lines = iter(["Who are you?", "", "again", "/quit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    real = gen.generate_stream
    calls: list = []

    def fake_stream(*args, **kwargs):
        calls.append(args[2])
        it = real(*args, **kwargs)
        yield next(it, "x")
        if len(calls) == 1:
            raise KeyboardInterrupt  # Ctrl-C while answering: stops this answer only

    monkeypatch.setattr(gen, "generate_stream", fake_stream)
    run_cli(f"ckpt={ckpts['chat']}", "interactive=true", "max_new_tokens=5", "seed=0")
    out, err = capsys.readouterr()
    assert "[stopped]" in out and "chat" in err
    # the second question carries the conversation so far (the template is in use)
    assert [m["role"] for m in calls[1]] == ["user", "assistant", "user"]


# ---- the real process: exit codes, no traceback --------------------------------------------


def _run(args: list[str], **kw) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, "-m", "tinyllm.generate", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        **kw,
    )


def test_cli_subprocess_end_to_end(ckpts, tmp_path: Path) -> None:
    r = _run([f"ckpt={ckpts['plain']}", "prompt=ROMEO:", "max_new_tokens=10", "seed=0",
              "temperature=0.8", "top_k=50", "top_p=0.95", "stop=[END]"], cwd=tmp_path)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("ROMEO:") and "tokens/s" in r.stderr
    assert list(tmp_path.iterdir()) == []  # no outputs/, .hydra/ or log files


def test_cli_subprocess_error_exit_code(ckpts, tmp_path: Path) -> None:
    r = _run([f"ckpt={tmp_path / 'missing.ckpt'}"], cwd=tmp_path)
    assert r.returncode == 2 and "error: Checkpoint not found" in r.stderr
    assert "Traceback" not in r.stderr
    r = _run([f"ckpt={ckpts['plain']}", "temperature=-0.5"], cwd=tmp_path)
    assert r.returncode == 2 and "temperature" in r.stderr and "Traceback" not in r.stderr
