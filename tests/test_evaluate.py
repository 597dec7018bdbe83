"""tinyllm.evaluate: every figure against an exact recomputation, and the bad-input paths."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from train_utils import TINY, read_metrics, train_in_process

from tinyllm.checkpoint import save_checkpoint
from tinyllm.errors import TinyLLMError
from tinyllm.eval.multiple_choice import ItemScore, bootstrap_ci, score_items, summarize
from tinyllm.eval.scoring import Scorer
from tinyllm.eval.tasks import Item, read_jsonl
from tinyllm.eval.text import score_text
from tinyllm.model import GPT, ModelConfig
from tinyllm.tokenizer import BPETokenizer

REPO = Path(__file__).resolve().parents[1]
TEXT = (
    "The quick brown fox jumps over the lazy dog. A stitch in time saves nine. "
    "To be, or not to be: that is the question. All that glitters is not gold. "
) * 6


@pytest.fixture(scope="module")
def tok() -> BPETokenizer:
    return BPETokenizer.train(TEXT, vocab_size=300, special_tokens=["<|endoftext|>"])


def tiny_model(vocab: int, block_size: int = 16, **kw) -> GPT:
    torch.manual_seed(0)
    cfg = dict(vocab_size=vocab, block_size=block_size, n_layer=2, n_head=2, n_embd=32)
    model = GPT(ModelConfig(**{**cfg, **kw})).eval()
    with torch.no_grad():  # random weights everywhere: a wrong index cannot hide
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return model


@pytest.fixture(scope="module")
def ckpt(tok, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "m.ckpt"
    save_checkpoint(path, tiny_model(tok.vocab_size), tok)
    return path


def logp_of(model: GPT, context: list[int], target: int) -> float:
    """The brute force: one forward pass over exactly `context`, log p(target)."""
    with torch.no_grad():
        logits = model(torch.tensor([context]))[0, -1]
    return F.log_softmax(logits.double(), -1)[target].item()


# ------------------------------------------------------------------------------- windows


@pytest.mark.parametrize("L", [2, 5, 16, 17, 40, 49])
@pytest.mark.parametrize("stride", [1, 3, 8, 16])
def test_windows_score_every_token_once(tok, L: int, stride: int) -> None:
    scorer = Scorer(tiny_model(tok.vocab_size), tok)
    T = scorer.block_size
    positions = []
    for n, w in enumerate(scorer.windows(range(L), stride)):
        assert len(w.ids) <= T and w.targets == [i + 1 for i in w.ids]
        new = w.targets[len(w.targets) - w.n_scored :]
        positions += new
        if n:  # after the first window every scored token has >= T - stride tokens of context
            assert new[0] - w.ids[0] >= T - stride
    assert positions == list(range(1, L))


def test_windows_stream_in_bounded_memory(tok) -> None:
    """A window is yielded after reading only its own tokens: an endless stream works."""
    scorer = Scorer(tiny_model(tok.vocab_size), tok)
    read = []

    def endless():
        i = 0
        while True:
            read.append(i)
            yield i
            i += 1

    windows = scorer.windows(endless(), stride=4)
    for k in range(50):
        w = next(windows)
        assert len(read) == 17 + 4 * k and w.ids[0] == 4 * k


@pytest.mark.parametrize("stride", [3, 8, 16])
def test_rolling_equals_per_token_brute_force(tok, stride: int) -> None:
    model = tiny_model(tok.vocab_size)
    scorer = Scorer(model, tok, batch_size=3)
    T, ids = 16, tok.encode(TEXT[:200])
    L = len(ids)
    expected = 0.0
    for p in range(1, L):  # the window that scores target p starts at j * stride
        j = max(0, math.ceil((p - T) / stride))
        expected += logp_of(model, ids[j * stride : p], ids[p])
    assert scorer.rolling(ids, stride) == pytest.approx(expected, abs=1e-4)


def test_score_text_figures_are_exact(tok, tmp_path) -> None:
    model = tiny_model(tok.vocab_size)
    folder = tmp_path / "texts"
    folder.mkdir()
    (folder / "a.txt").write_text(TEXT[:150], encoding="utf-8")
    (folder / "b.txt").write_text("héllo wörld " * 5, encoding="utf-8")
    res = score_text(Scorer(model, tok, batch_size=2), str(folder), stride=16)
    assert res["stride"] == 16 and res["windows"] == "non-overlapping"
    assert [r["name"] for r in res["files"]] == ["a.txt", "b.txt"]
    total_nll = total_bytes = total_tokens = 0
    for row, text in zip(res["files"], [TEXT[:150], "héllo wörld " * 5]):
        ids = [tok.eos_id, *tok.encode(text)]  # EOS stands before a document
        nll = -sum(logp_of(model, ids[(p - 1) // 16 * 16 : p], ids[p]) for p in range(1, len(ids)))
        nbytes = len(text.encode("utf-8"))
        assert row["tokens"] == len(ids) - 1 and row["bytes"] == nbytes
        assert row["nll"] == pytest.approx(nll, abs=1e-4)
        assert row["bpb"] == pytest.approx(nll / math.log(2) / nbytes, rel=1e-5)
        assert row["nats_per_token"] == pytest.approx(nll / (len(ids) - 1), rel=1e-5)
        assert row["perplexity"] == pytest.approx(math.exp(nll / (len(ids) - 1)), rel=1e-5)
        total_nll, total_bytes, total_tokens = (
            total_nll + nll,
            total_bytes + nbytes,
            total_tokens + len(ids) - 1,
        )
    assert res["total"]["bpb"] == pytest.approx(total_nll / math.log(2) / total_bytes, rel=1e-5)
    assert res["total"]["tokens"] == total_tokens
    default = score_text(Scorer(model, tok), str(folder / "a.txt"))
    assert default["stride"] == 8 and "sliding" in default["windows"]


# ------------------------------------------------------------------------- loglikelihood


def test_encode_pair_follows_the_harness(tok) -> None:
    scorer = Scorer(tiny_model(tok.vocab_size), tok)
    ctx, cont = scorer.encode_pair("The quick ", "brown fox")  # trailing space moves over
    assert ctx == tok.encode("The quick")
    assert ctx + cont == tok.encode("The quick brown fox")
    assert scorer.encode_pair("", "fox") == ([tok.eos_id], tok.encode("fox"))


@pytest.mark.parametrize("pos", ["learned", "rope", "alibi"])
def test_loglikelihood_paths_equal_brute_force(tok, pos: str) -> None:
    model = tiny_model(tok.vocab_size, pos=pos)
    scorer = Scorer(model, tok, batch_size=2)
    ctx = tok.encode("To be, or not to be")
    conts = [tok.encode(s) for s in [" that", " is the question", " x", " the lazy dog"]]
    long_ctx = tok.encode(TEXT[:120])  # longer than the window: left-truncated
    pairs = [(ctx, c) for c in conts] + [(long_ctx, conts[1]), (ctx[:3], conts[2])]
    got = scorer.loglikelihood(pairs)
    for (c, cont), (ll, greedy) in zip(pairs, got):
        seq = (c + cont)[-17:]  # the last block_size + 1 tokens
        n = len(cont)
        expected = sum(logp_of(model, seq[: len(seq) - n + k], cont[k]) for k in range(n))
        assert ll == pytest.approx(expected, abs=1e-4)
        argmaxes = []
        for k in range(n):
            with torch.no_grad():
                argmaxes.append(model(torch.tensor([seq[: len(seq) - n + k]]))[0, -1].argmax())
        assert greedy == all(int(a) == t for a, t in zip(argmaxes, cont))


# ---------------------------------------------------------------------- multiple choice


def test_summarize_recomputes_exactly() -> None:
    scores = [
        ItemScore("a", 0, [-1.0, -2.0], [1, 1]),  # acc right, norm right
        ItemScore("b", 1, [-1.0, -3.0], [1, 6]),  # acc wrong, norm right (-0.5 > -1)
        ItemScore("c", 2, [-5.0, -1.0, -9.0], [5, 1, 9]),  # both wrong
    ]
    m = summarize(scores, n_boot=500, seed=1)
    assert m["acc"] == pytest.approx(1 / 3) and m["acc_norm"] == pytest.approx(2 / 3)
    assert m["chance"] == pytest.approx((1 / 2 + 1 / 2 + 1 / 3) / 3)
    lo, hi = m["acc_ci95"]
    assert 0.0 <= lo <= m["acc"] <= hi <= 1.0
    rng = np.random.default_rng(1)
    correct = np.array([1.0, 0.0, 0.0])
    means = correct[rng.integers(0, 3, size=(500, 3))].mean(axis=1)
    assert (lo, hi) == tuple(np.quantile(means, [0.025, 0.975]))
    assert bootstrap_ci(np.ones(10)) == (1.0, 1.0)


def test_score_items_uses_per_choice_loglikelihoods(tok) -> None:
    model = tiny_model(tok.vocab_size)
    scorer = Scorer(model, tok)
    items = [Item("A stitch in", [" time", " the dog", " gold"], 0, "x")]
    (s,) = score_items(scorer, items)
    for choice, ll in zip(items[0].choices, s.loglikelihoods):
        ctx, cont = scorer.encode_pair("A stitch in", choice)
        seq = ctx + cont
        exp = sum(logp_of(model, seq[: len(ctx) + k], cont[k]) for k in range(len(cont)))
        assert ll == pytest.approx(exp, abs=1e-4)
    assert s.choice_bytes == [5, 8, 5]


# ------------------------------------------------------------------------------ command


def compose_eval(overrides: list[str]):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose("evaluate", overrides=overrides)


def test_command_writes_json_with_everything(ckpt, tok, tmp_path, capsys) -> None:
    import hashlib

    def sha256_file(p: Path) -> str:  # recomputed independently
        return hashlib.sha256(p.read_bytes()).hexdigest()

    from tinyllm.evaluate import run

    task = REPO / "examples" / "tasks" / "agreement.jsonl"
    (tmp_path / "t.txt").write_text(TEXT, encoding="utf-8")
    out = tmp_path / "res" / "eval.json"
    cfg = compose_eval(
        [f"ckpt={ckpt}", f"text={tmp_path / 't.txt'}", f"tasks=[{task}]", f"out={out}"]
    )
    run(cfg)
    printed = capsys.readouterr().out
    assert "agreement" in printed and "bits/byte" in printed
    res = json.loads(out.read_text())
    assert res["checkpoint"]["sha256"] == sha256_file(ckpt)
    t = res["tasks"]["agreement"]
    assert t["sha256"] == sha256_file(task) and t["items"] == 48 and t["chance"] == 0.5
    assert res["settings"]["tasks"] == [str(task)]
    items = read_jsonl(task)
    correct = sum(
        int(np.argmax(p["loglikelihoods"]) == it.label) for p, it in zip(t["per_item"], items)
    )
    assert t["acc"] == correct / 48
    assert res["text"]["files"][0]["tokens"] == len(tok.encode(TEXT))


BAD_LINES = [
    ("not json\n", "not valid JSON", ":1"),
    ('{"context": "a", "choices": [" b"]}\n', "missing field", ":1"),
    ('\n{"context": "a", "choices": [" b", " c"], "label": 2}\n', "out of range", ":2"),
    ('{"context": "a", "choices": [], "label": 0}\n', "non-empty list", ":1"),
    ('{"context": "a", "choices": [" b", ""], "label": 0}\n', "non-empty string", ":1"),
    ('{"context": "a", "choices": [" b"], "label": "x"}\n', "integer", ":1"),
]


@pytest.mark.parametrize("content, problem, line", BAD_LINES)
def test_bad_task_lines_name_file_and_line(content, problem, line, tmp_path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(TinyLLMError, match=problem) as e:
        read_jsonl(path)
    assert f"{path}{line}:" in str(e.value)


def test_hellaswag_layout(tmp_path) -> None:
    path = tmp_path / "hs.jsonl"
    row = {"ind": 7, "ctx": "A man is", "endings": ["sitting.", "flying."], "label": "1"}
    path.write_text(json.dumps(row) + "\n")
    (item,) = read_jsonl(path)
    assert (item.context, item.choices, item.label, item.id) == (
        "A man is",
        [" sitting.", " flying."],
        1,
        "7",
    )


@pytest.mark.parametrize(
    "make, problem",
    [
        (lambda p: p.write_bytes(b""), "is empty"),
        (lambda p: p.write_bytes(b"abc\x00\x01def"), "looks binary"),
        (lambda p: p.write_bytes(b"caf\xe9 ok"), "not valid UTF-8"),
    ],
)
def test_bad_text_is_refused(ckpt, tmp_path, make, problem) -> None:
    from tinyllm.evaluate import run

    bad = tmp_path / "x.txt"
    make(bad)
    out = tmp_path / "out.json"
    cfg = compose_eval([f"ckpt={ckpt}", f"text={bad}", "bad_files=error", f"out={out}"])
    with pytest.raises(TinyLLMError, match=problem):
        run(cfg)
    assert not out.exists() and list(tmp_path.iterdir()) == [bad]


def test_invalid_utf8_is_replaced_with_a_warning(ckpt, tok, tmp_path) -> None:
    from tinyllm.evaluate import run

    bad = tmp_path / "x.txt"
    bad.write_bytes(b"caf\xe9 au lait, the quick brown fox")
    with pytest.warns(UserWarning, match="not valid UTF-8"):
        res = run(compose_eval([f"ckpt={ckpt}", f"text={bad}"]))
    row = res["text"]["files"][0]
    text = "caf\ufffd au lait, the quick brown fox"
    assert row["bad_utf8"] and row["bytes"] == len(text.encode("utf-8"))
    assert row["tokens"] == len(tok.encode(text))


def test_cli_exit_2_for_foreign_checkpoint_and_bad_task(tmp_path) -> None:
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"weights": torch.zeros(2)}, foreign)
    task = tmp_path / "t.jsonl"
    task.write_text('{"context": "a", "choices": [" b"], "label": 3}\n')
    out = tmp_path / "o.json"
    for args, needle in (
        (
            [f"ckpt={foreign}", f"tasks=[{REPO / 'examples/tasks/arithmetic.jsonl'}]"],
            "not a tinyllm",
        ),
        ([f"ckpt={foreign}", f"tasks=[{task}]"], f"{task}:1"),
    ):
        r = subprocess.run(
            [sys.executable, "-m", "tinyllm.evaluate", *args, f"out={out}"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert r.returncode == 2, r.stderr
        assert needle in r.stderr and "Traceback" not in r.stderr
        assert not out.exists()


# ----------------------------------------------------------------- reproduces val/bpb


def test_non_overlapping_windows_reproduce_the_runs_val_bpb(tmp_path) -> None:
    """Score the validation text of a prepared corpus with stride=block_size: the figure is
    the run's val/bpb. Not to the last digit: validation skips the split's first token and
    its tail (< block_size tokens), which text scoring counts (the first after EOS)."""
    from pydoc_data.topics import topics

    from tinyllm.data.prepare import read_meta
    from tinyllm.evaluate import run

    corpus = tmp_path / "corpus.txt"  # one document: val.bin is exactly the val text's tokens
    corpus.write_text("\n\n".join(topics[k][:3000] for k in sorted(topics)[:40]))
    run_dir, data_root = tmp_path / "run", tmp_path / "data"
    overrides = [*TINY, "data=text", f"data.path={corpus}", f"data_root={data_root}"]
    train_in_process([*overrides, "loader.val_windows=null", "logger=none"], run_dir)
    m = read_metrics(run_dir)
    (folder,) = [p for p in data_root.iterdir() if p.is_dir()]
    meta = read_meta(folder)
    ids = np.fromfile(folder / "val.bin", dtype=meta["dtype"])
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    tok = BPETokenizer.from_dict(
        torch.load(ckpt, weights_only=False)["hyper_parameters"]["tokenizer"]
    )
    val_text = tmp_path / "val.txt"
    val_text.write_bytes(tok.decode_bytes(ids))
    assert len(val_text.read_bytes()) == meta["splits"]["val"]["bytes"]
    block = torch.load(ckpt, weights_only=False)["hyper_parameters"]["model_config"]["block_size"]
    res = run(compose_eval([f"ckpt={ckpt}", f"text={val_text}", f"stride={block}"]))
    row = res["text"]["total"]
    assert row["tokens"] == len(ids) and row["bytes"] == meta["splits"]["val"]["bytes"]
    assert row["bpb"] == pytest.approx(m["val/bpb"], rel=1e-3)
    assert row["nats_per_token"] == pytest.approx(m["val/loss"], rel=1e-3)


# ---------------------------------------------------------------- download, generator


@pytest.fixture
def hellaswag_server():
    import http.server
    import threading

    rows = [
        {
            "ind": i,
            "ctx": f"A person number {i} is",
            "endings": [" a", " b", " c", " d"],
            "label": i % 4,
        }
        for i in range(5)
    ]
    payload = "".join(json.dumps(r) + "\n" for r in rows).encode()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server API)
            self.send_response(200)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/hellaswag_val.jsonl", payload
    httpd.shutdown()
    httpd.server_close()


def test_hellaswag_download_is_checksummed(hellaswag_server, tmp_path, monkeypatch) -> None:
    import hashlib

    from tinyllm.eval import tasks

    url, payload = hellaswag_server
    monkeypatch.setenv("TINYLLM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(tasks.HELLASWAG, "url", url)
    monkeypatch.setitem(tasks.HELLASWAG, "sha256", hashlib.sha256(payload).hexdigest())
    task = tasks.load_task("hellaswag")
    assert task.name == "hellaswag" and len(task.items) == 5
    assert task.items[2].label == 2 and task.items[2].choices[0] == "  a"
    assert task.sha256 == hashlib.sha256(payload).hexdigest()
    assert (tmp_path / "cache" / "tasks" / "hellaswag_val.jsonl").is_file()
    (tmp_path / "cache" / "tasks" / "hellaswag_val.jsonl").write_text("tampered\n")
    with pytest.raises(TinyLLMError, match="sha256"):
        tasks.load_task("hellaswag")
    monkeypatch.setitem(tasks.HELLASWAG, "sha256", "0" * 64)
    with pytest.raises(TinyLLMError, match="expected 0000"):
        tasks.load_task("hellaswag")


def test_nextpassage_generator_command(tmp_path) -> None:
    from tinyllm.eval.nextpassage import make_items

    src = tmp_path / "src.txt"
    src.write_text(" ".join(f"word{i}" for i in range(3000)), encoding="utf-8")
    out = tmp_path / "np.jsonl"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "tinyllm.eval.nextpassage",
            f"text={src}",
            f"out={out}",
            "items=20",
            "choices=3",
            "context_chars=100",
            "continuation_chars=50",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    items = read_jsonl(out)
    assert len(items) == 20 and all(len(it.choices) == 3 for it in items)
    for it in items:  # the true continuation follows the context in the source text
        assert (it.context + it.choices[it.label]) in src.read_text()
        assert len(set(it.choices)) == 3
    again = make_items(src.read_text(), 20, 3, 100, 50, seed=0)
    assert [(i.context, i.choices, i.label) for i in again] == [
        (i.context, i.choices, i.label) for i in items
    ]
    with pytest.raises(TinyLLMError, match="too few"):
        make_items("just a few words", 5, 4, 100, 50)


def test_missing_text_and_overlong_choice(tok, ckpt, tmp_path) -> None:
    from tinyllm.evaluate import run

    with pytest.raises(TinyLLMError, match="does not exist"):
        run(compose_eval([f"ckpt={ckpt}", f"text={tmp_path / 'nope.txt'}"]))
    scorer = Scorer(tiny_model(tok.vocab_size), tok)
    with pytest.raises(TinyLLMError, match="longer than the model's context"):
        scorer.loglikelihood([([1], list(range(17)))])


def test_config_typo_is_one_paragraph_exit_2(ckpt) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "tinyllm.evaluate", f"ckpt={ckpt}", "strid=4"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "strid" in r.stderr and "stride" in r.stderr  # the closest valid key is named


def test_result_json_keeps_nan_visible(tmp_path) -> None:
    """A NaN figure (a diverged checkpoint's bits per byte) is written as "NaN", as in
    metrics.json, never as null (which reads as "not measured") or a bare NaN (invalid JSON)."""
    from tinyllm.eval.report import write_json

    out = write_json({"text": {"bpb": float("nan"), "loss": float("inf"), "n": 3}},
                     tmp_path / "r.json")  # fmt: skip
    raw = out.read_text()
    got = json.loads(raw)  # strict enough: the bare words NaN/Infinity would not be standard
    assert "NaN" not in raw.replace('"NaN"', "") and got["text"]["n"] == 3
    assert got["text"]["bpb"] == "NaN" and got["text"]["loss"] == "Infinity"
    assert math.isnan(float(got["text"]["bpb"]))
