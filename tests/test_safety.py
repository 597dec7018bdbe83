"""Issue 15: nothing lost, nothing trusted blindly.

Each test reproduces one defect the issue found (a crafted file made in the test, a signal
sent from the test) and checks the fix: untrusted checkpoints, silent corruption, crafted
tokenizers and Q&A files, partial writes, preemption signals.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from train_utils import TINY, text_run, train_in_process, write_corpus

from tinyllm.checkpoint import (
    CHECKSUM_KEY,
    read_checkpoint,
    save_checkpoint,
    tensors_checksum,
)
from tinyllm.errors import TinyLLMError
from tinyllm.model import GPT, ModelConfig
from tinyllm.tokenizer import BPETokenizer

TEXT = "the quick brown fox jumps over the lazy dog; pack my box with five dozen jugs. " * 40


@pytest.fixture(scope="module")
def tok() -> BPETokenizer:
    return BPETokenizer.train(TEXT, 300)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus"), n_docs=20)


def base(corpus, data_root) -> list[str]:
    return [*text_run(corpus, data_root), "trainer.max_steps=6", "trainer.val_check_interval=3"]


@pytest.fixture(scope="module")
def trained(corpus, data_root, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run")
    final = train_in_process(base(corpus, data_root), run_dir)
    return run_dir, final


def tiny_ckpt(tok: BPETokenizer, path: Path) -> Path:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tok.vocab_size, block_size=16, n_layer=1, n_head=2, n_embd=32)
    save_checkpoint(path, GPT(cfg), tok)
    return path


# ------------------------------------------------------------------ untrusted checkpoints
class _CreatesAFile:
    """Unpickling this calls open(target, "w"): the file appearing means code ran."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self):
        return (open, (str(self.target), "w"))


def crafted_ckpt(path: Path, target: Path) -> Path:
    hp = {"model_config": {"vocab_size": 300}, "payload": _CreatesAFile(target)}
    torch.save({"state_dict": {}, "hyper_parameters": hp}, path)
    return path


def test_crafted_checkpoint_runs_no_code_in_generate(tmp_path):
    from tinyllm.generate import load_for_generation

    target = tmp_path / "pwned"
    with pytest.raises(TinyLLMError, match="Refusing to load"):
        load_for_generation(crafted_ckpt(tmp_path / "evil.ckpt", target))
    assert not target.exists()


@pytest.mark.parametrize("option", ["ckpt_path", "init_from"])
def test_crafted_checkpoint_runs_no_code_in_train(corpus, data_root, tmp_path, option):
    target = tmp_path / "pwned"
    evil = crafted_ckpt(tmp_path / "evil.ckpt", target)
    with pytest.raises(TinyLLMError, match="Refusing to load"):
        train_in_process([*base(corpus, data_root), f"{option}={evil}"], tmp_path / "run")
    assert not target.exists()


PLAIN = (dict, list, tuple, str, int, float, bool, type(None), torch.Tensor)


def _types(obj) -> set[type]:
    if isinstance(obj, dict):
        return {dict}.union(*(_types(k) | _types(v) for k, v in obj.items()))
    if isinstance(obj, (list, tuple)):
        return {type(obj)}.union(*(_types(v) for v in obj))
    return {type(obj)}


def test_own_checkpoints_hold_only_plain_types(trained):
    """What training writes loads with weights_only=True and holds no other type: the safe
    loader needs no allowlist (a new type sneaking into checkpoints fails here)."""
    run_dir, _ = trained
    for name in ("last.ckpt", "best.ckpt"):
        raw = torch.load(run_dir / "checkpoints" / name, weights_only=True)
        assert _types(raw) <= set(PLAIN), _types(raw) - set(PLAIN)
        assert raw[CHECKSUM_KEY] == tensors_checksum(raw)
        read_checkpoint(run_dir / "checkpoints" / name)


# ------------------------------------------------------------------ silent corruption
def _flip_inside_weights(path: Path, tensor: torch.Tensor, n: int = 16) -> None:
    data = bytearray(path.read_bytes())
    raw = tensor.detach().numpy().tobytes()
    at = data.find(raw[:64])
    assert at > 0, "tensor bytes not found in the file"
    for i in range(at + 128, at + 128 + n):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def test_flipped_bytes_in_weights_are_detected(tok, tmp_path):
    path = tiny_ckpt(tok, tmp_path / "m.ckpt")
    wte = torch.load(path, weights_only=True)["state_dict"]["model.transformer.wte.weight"]
    read_checkpoint(path)  # intact: loads
    _flip_inside_weights(path, wte)
    with pytest.raises(TinyLLMError, match="corrupted"):
        read_checkpoint(path)


def test_flipped_bytes_stop_a_resume(trained, corpus, data_root, tmp_path):
    run_dir, _ = trained
    path = tmp_path / "last.ckpt"
    path.write_bytes((run_dir / "checkpoints" / "last.ckpt").read_bytes())
    raw = torch.load(path, weights_only=True)
    _flip_inside_weights(path, raw["state_dict"]["model.transformer.wte.weight"])
    with pytest.raises(TinyLLMError, match="corrupted"):
        train_in_process([*base(corpus, data_root), f"ckpt_path={path}"], tmp_path / "r")


def test_checksum_covers_names_and_values(tok, tmp_path):
    a = {"state_dict": {"w": torch.ones(3)}, "x": 1}
    b = {"state_dict": {"v": torch.ones(3)}, "x": 1}
    c = {"state_dict": {"w": torch.tensor([1.0, 1.0, 1.0 + 1e-7])}, "x": 1}
    assert len({tensors_checksum(a), tensors_checksum(b), tensors_checksum(c)}) == 3
    assert tensors_checksum({"s": torch.tensor(2.0, dtype=torch.bfloat16)})  # 0-dim, bf16
    assert pickle.dumps(a)  # (plain values)


# ------------------------------------------------------------------ crafted tokenizer files
def _tok_file(path: Path, merges, pattern: str = "gpt4", **extra) -> Path:
    import json

    d = {"format": "tinyllm.bpe", "version": 1, "pattern": pattern, "special_tokens": {},
         "merges": merges, **extra}  # fmt: skip
    path.write_text(json.dumps(d))
    return path


def test_reversed_merges_load_in_linear_time(tmp_path):
    """20k merges, each made from the one listed after it: quadratic passes took > 300 s."""
    n = 20_000
    chain = [[97, 97, 256]] + [[256 + i - 1, 97, 256 + i] for i in range(1, n)]
    tok = BPETokenizer.load(_tok_file(tmp_path / "rev.json", chain[::-1]))
    assert tok.vocab_size == 256 + n
    assert tok.token_bytes(256 + n - 1) == b"a" * (n + 1)


@pytest.mark.parametrize(
    "merges, extra, match",
    [
        ([[97, 97, 256]], {"vocab_size": 10**15}, "vocab_size=1000000000000000"),
        ([[97, 5000, 256]], {}, r"merge #0 \(97, 5000\)"),
        ([[97, 97, 256], [256, 300, 257]], {}, "merge #1"),
        ([[97, 97, 10**12]], {}, "outside"),
        ([], {"special_tokens": {"<x>": 10**15}}, "outside"),
        ([[1e300, 97, 256]], {}, "integers"),
        ([[97, 256, 256]], {}, "merge #0"),  # a merge made of itself
    ],
)
def test_crafted_tokenizer_files_are_clear_errors(tmp_path, merges, extra, match):
    with pytest.raises(TinyLLMError, match=match):
        BPETokenizer.load(_tok_file(tmp_path / "t.json", merges, **extra))


def test_catastrophic_split_pattern_is_refused_on_load(tmp_path):
    """`(a|a)+$|.` needs ~50 s for 26 characters: refused by the load-time probe."""
    with pytest.raises(TinyLLMError, match="backtracks catastrophically"):
        BPETokenizer.load(_tok_file(tmp_path / "t.json", [], pattern=r"(a|a)+$|."))
    assert BPETokenizer([], pattern=r"\w+|\s+|.").encode("hi there") == list(b"hi there")


def test_custom_split_pattern_is_time_limited(monkeypatch):
    """A pattern the probes miss still cannot stall encoding: each split has a time limit."""
    from tinyllm.tokenizer import patterns

    tok = BPETokenizer([], pattern=r"(?:x|x)+y|.")  # backtracks on runs of x only
    monkeypatch.setattr(patterns, "CUSTOM_TIMEOUT_S", 0.05)
    monkeypatch.setattr(patterns, "CUSTOM_S_PER_CHAR", 0.0)
    assert tok.encode("xxy") == list(b"xxy")
    with pytest.raises(TinyLLMError, match="custom split pattern"):
        tok.encode("x" * 40)


# ------------------------------------------------------------------ prepare: kills, leftovers
def _children(pid: int) -> list[int]:
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")  # (a zombie has exited; only its parent can reap it)


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")
def test_kill_9_of_prepare_kills_its_workers_and_the_next_start_cleans_up(tok, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    import numpy as np

    from tinyllm.data.prepare import prepare_data

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    rng = np.random.default_rng(0)
    words = np.array(TEXT.split())
    for i in range(8):  # ~4 MB: encoding takes a while with 2 workers
        (corpus / f"d{i}.txt").write_text(" ".join(rng.choice(words, 100_000)))
    tok.save(tmp_path / "tok.json")
    out = tmp_path / "out"
    tok_file = tmp_path / "tok.json"
    cmd = [sys.executable, "-m", "tinyllm.prepare", "data=text", f"data.path={corpus}",
           f"tokenizer.path={tok_file}", f"out_dir={out}", "num_workers=2"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        kids = _children(proc.pid)
        if len(kids) >= 2 and list(out.glob(".train.bin.tmp-*")):
            break
        time.sleep(0.05)
    assert proc.poll() is None, proc.stderr.read().decode()
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    deadline = time.monotonic() + 30
    while any(_running(k) for k in kids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [k for k in kids if _running(k)], "encoding workers outlived prepare"
    assert list(out.glob(".train.bin.tmp-*"))  # what the kill left behind
    (corpus / "small").mkdir()
    (corpus / "small" / "a.txt").write_text(TEXT)
    (corpus / "small" / "b.txt").write_text(TEXT[::-1])
    prepare_data({"source": "text", "path": str(corpus / "small")},
                 {"path": str(tmp_path / "tok.json")}, out, num_workers=1)  # fmt: skip
    assert not [p.name for p in out.iterdir() if ".tmp" in p.name]


def test_different_sources_never_share_a_prepared_folder(tmp_path):
    from tinyllm.data.prepare import default_data_dir

    tok_cfg = {"vocab_size": 320}
    a = default_data_dir({"name": "text", "source": "text", "path": "a.txt"}, tok_cfg)
    b = default_data_dir({"name": "text", "source": "text", "path": "b.txt"}, tok_cfg)
    c = default_data_dir({"name": "text", "source": "text", "path": "a.txt",
                          "val_fraction": 0.2}, tok_cfg)  # fmt: skip
    assert len({a, b, c}) == 3 and a.name.startswith("text-320-")
    assert a == default_data_dir({"name": "text", "source": "text", "path": "a.txt"}, tok_cfg)


def test_ids_beyond_the_vocabulary_are_refused_on_load(tmp_path):
    import json

    from tinyllm.data.prepare import prepare_data, read_meta

    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "a.txt").write_text(TEXT)
    (tmp_path / "c" / "b.txt").write_text(TEXT[::-1])
    out = prepare_data({"source": "text", "path": str(tmp_path / "c")},
                       {"vocab_size": 300}, tmp_path / "o", num_workers=1)  # fmt: skip
    meta = json.loads((out / "meta.json").read_text())
    ids = [np.fromfile(out / f"{s}.bin", dtype=meta["dtype"]) for s in ("train", "val")]
    assert meta["max_token_id"] == max(int(i.max()) for i in ids) < meta["vocab_size"]
    meta["max_token_id"] = 400  # bins written with a bigger tokenizer
    (out / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(TinyLLMError, match=r"token ids up to 400.*vocabulary has 300.*force=true"):
        read_meta(out)


def test_few_documents_keep_the_validation_share_near_the_one_asked(tmp_path, capsys):
    """3 files, val_fraction=0.1: one whole file (51% of the text) went to validation."""
    from tinyllm.data.prepare import prepare_data, read_meta

    (tmp_path / "c").mkdir()
    for name, n in (("a", 60), ("b", 20), ("c", 38)):
        (tmp_path / "c" / f"{name}.txt").write_text(TEXT[: n * 80])
    out = prepare_data({"source": "text", "path": str(tmp_path / "c"), "val_fraction": 0.1},
                       {"vocab_size": 300}, tmp_path / "o", num_workers=1)  # fmt: skip
    meta = read_meta(out)
    sp = meta["splits"]
    share = sp["val"]["bytes"] / (sp["val"]["bytes"] + sp["train"]["bytes"])
    assert 0.09 < share < 0.11
    assert "last" in meta["split"]["note"] and "split: " in capsys.readouterr().err


# ------------------------------------------------------------------ Q&A files from strangers
def _qa_file(path: Path, records: list[dict]) -> Path:
    import json

    path.write_text(json.dumps(records))
    return path


def test_qa_file_with_invalid_utf8_is_a_clear_error(tmp_path):
    from tinyllm.data.qa_records import load_qa_records

    bad = tmp_path / "qa.json"
    bad.write_bytes(b'[{"question": "caf\xe9?", "answer": "yes"}]')
    with pytest.raises(TinyLLMError, match="not UTF-8.*save it as UTF-8"):
        load_qa_records(bad)


def test_huge_qa_answers_and_prompts_stay_bounded(tok, tmp_path):
    """A 100k-character answer and a 1 MB question: examples are cut to the block (with a
    warning), and exact match spends no forward on an answer that cannot fit the block (it
    used to generate reference-length + 8 tokens, one forward each)."""
    from tinyllm.data.qa import QADataModule, exact_match

    records = [{"question": "q" * 1_000_000, "answer": "a"},
               {"question": "what?", "answer": "the fox " * 12_500}]  # fmt: skip
    records += [{"question": f"q{i}", "answer": f"a{i}"} for i in range(8)]
    path = _qa_file(tmp_path / "qa.json", records)
    with pytest.warns(UserWarning, match="were cut"):
        dm = QADataModule(path, tok, block_size=32, batch_size=4, val_count=0)
    assert max(x.numel() for x, _ in dm.train_dataset.items) <= 32
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=tok.vocab_size, block_size=32, n_layer=1, n_head=2,
                            n_embd=32))  # fmt: skip
    calls = []
    model.register_forward_hook(lambda *a: calls.append(1))
    assert exact_match(model, tok, records[:2]) == 0.0
    assert not calls  # neither fits the 32-token block: both misses without generating


def test_a_1mb_prompt_is_cropped_to_the_context(tok):
    from tinyllm.sampling import generate

    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=tok.vocab_size, block_size=16, n_layer=1, n_head=2,
                            n_embd=32)).eval()  # fmt: skip
    with pytest.warns(UserWarning, match="block_size"):
        out = generate(model, tok, "the fox " * 131_072, max_new_tokens=4, seed=0)
    assert isinstance(out, str)


# ------------------------------------------------------------------ file modes, full disks
def test_checkpoints_honour_the_umask(tok, tmp_path):
    """mkstemp made every checkpoint 0600: a group sharing the run folder could not read it."""
    import os

    for umask in (0o022, 0o002):
        old = os.umask(umask)
        try:
            path = tiny_ckpt(tok, tmp_path / f"m{umask:o}.ckpt")
        finally:
            os.umask(old)
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask


def test_training_checkpoints_honour_the_umask(trained):
    import os

    run_dir, _ = trained
    umask = os.umask(0)
    os.umask(umask)
    for p in (run_dir / "checkpoints").glob("*.ckpt"):
        assert p.stat().st_mode & 0o777 == 0o666 & ~umask, p


_FULL_DISK = """
import os, sys, torch
from tinyllm.checkpoint import load_trusted_types_only
from tinyllm.io import torch_save_atomic as atomic_torch_save
from tinyllm.errors import TinyLLMError
d = sys.argv[1]
atomic_torch_save({"w": torch.ones(1000)}, d + "/last.ckpt")
try:
    atomic_torch_save({"w": torch.zeros(2_000_000)}, d + "/last.ckpt")  # 8 MB on a 4 MB disk
    print("NO ERROR")
except TinyLLMError as e:
    print("ERROR", e)
print("LEFT", sorted(os.listdir(d)))
print("KEPT", int(load_trusted_types_only(d + "/last.ckpt")["w"].sum()))
"""


def test_disk_full_during_a_save_is_a_clear_error_and_keeps_the_previous_file(tmp_path):
    """A real full disk: a 4 MB tmpfs in a private mount namespace (skipped where unprivileged
    user namespaces are off). It used to surface as 'inline_container.cc:672 unexpected pos'."""
    import shutil
    import subprocess
    import sys

    if not shutil.which("unshare"):
        pytest.skip("needs unshare (util-linux)")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    mount = 'mount -t tmpfs -o size=4m tmpfs "$0" && exec "$1" -c "$2" "$0"'
    r = subprocess.run(["unshare", "-rm", "sh", "-c", mount, str(mnt), sys.executable, _FULL_DISK],
                       capture_output=True, text=True, timeout=120)  # fmt: skip
    if "LEFT" not in r.stdout:
        pytest.skip(f"cannot mount a small tmpfs here: {r.stderr.strip()[-200:]}")
    assert f"ERROR disk full at {mnt}/last.ckpt" in r.stdout, r.stdout + r.stderr
    assert "LEFT ['last.ckpt']" in r.stdout  # no temporary left behind
    assert "KEPT 1000" in r.stdout  # the previous last.ckpt is intact


# ------------------------------------------------------------------ dead runs in the report
def test_report_marks_a_killed_run_stale(tmp_path):
    """kill -9 leaves metrics.json at status running forever; pid + host + heartbeat tell."""
    import socket
    import subprocess
    import time

    from test_report import metrics_for, write_job

    from tinyllm.analysis import load_sweep, summarize
    from tinyllm.report import main

    dead = subprocess.Popen(["true"])
    dead.wait()
    host = socket.gethostname()
    now = time.time()
    root = tmp_path / "sweep"
    write_job(root, 0, ["pos=learned", "seed=0"], metrics_for(2.1))
    write_job(root, 1, ["pos=rope", "seed=0"], metrics_for(2.0, status="running",
              pid=dead.pid, host=host, heartbeat=now))  # fmt: skip
    write_job(root, 2, ["pos=alibi", "seed=0"], metrics_for(2.2, status="running",
              pid=1, host="elsewhere", heartbeat=now - 3600, heartbeat_every_s=60))  # fmt: skip
    write_job(root, 3, ["pos=none", "seed=0"], metrics_for(2.3, status="running",
              pid=1, host="elsewhere", heartbeat=now, heartbeat_every_s=60))  # fmt: skip
    nan = float("nan")  # a diverged run: reported as NaN, `degraded`, never ranked
    write_job(root, 4, ["pos=rope2", "seed=0"], metrics_for(nan, status="degraded"))
    sweep = load_sweep(root)
    assert [r.status for r in sweep.runs] == ["completed", "stale", "stale", "running", "degraded"]
    means = {row.key: row.mean for row in summarize(sweep, "val/bpb")}
    assert means == {(("pos", "learned"),): 2.1, (("pos", "rope"),): None,
                     (("pos", "alibi"),): None, (("pos", "none"),): None,
                     (("pos", "rope2"),): None}  # fmt: skip
    assert main([str(root), "--out", str(tmp_path / "rep")]) in (0, None)
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "| 1 | `pos=rope seed=0` | stale |" in md


# ------------------------------------------------------------------ what a run reports
def test_last_ckpt_holds_the_newest_weights_when_validation_stops_improving(
    corpus, data_root, tmp_path
):
    """Lightning 2.6's save_last wrote last.ckpt only when val/bpb improved: with a learning
    rate of 1e-30 the weights never change and the validations tie, so last.ckpt stayed at
    the first validation's step."""
    run_dir = tmp_path / "run"
    train_in_process([*base(corpus, data_root), "optim.lr=1e-30"], run_dir)
    last = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    best = torch.load(run_dir / "checkpoints" / "best.ckpt", weights_only=True)
    assert best["global_step"] == 3 and last["global_step"] == 6
    # (and metrics.json names the process, with a heartbeat)
    import json
    import os
    import socket
    import time

    m = json.loads((run_dir / "metrics.json").read_text())
    assert m["pid"] == os.getpid() and m["host"] == socket.gethostname()
    assert 0 <= time.time() - m["heartbeat"] < 600 and m["status"] == "completed"


def test_a_diverged_run_reports_nan_and_is_degraded(corpus, data_root, tmp_path):
    """nan_policy=skip once ended `completed` with val/loss 0.0 (SumMetric drops NaN)."""
    import json
    import math

    run_dir = tmp_path / "run"
    diverge = ["nan_policy=skip", "optim.lr=1e12", "optim.warmup_steps=0",
               "trainer.gradient_clip_val=null"]  # fmt: skip
    train_in_process([*base(corpus, data_root), *diverge], run_dir)

    def refuse(word: str) -> None:
        raise AssertionError(f"metrics.json is not strict JSON: bare {word}")

    # strict JSON (jq and JavaScript reject bare NaN); the NaN is a string float() reads
    m = json.loads((run_dir / "metrics.json").read_text(), parse_constant=refuse)
    assert m["status"] == "degraded" and m["skipped_steps"] > 0
    assert m["val/loss"] == "NaN" and math.isnan(float(m["val/bpb"]))
    assert all(math.isnan(float(h["val/loss"])) for h in m["history"])


def test_val_loss_is_exact_under_bf16_true(corpus, data_root, tmp_path):
    """bf16-true casts metric states to bf16: the validation sums must stay float64, so
    val/loss equals a float64 recomputation over the same windows with the same weights."""
    import json

    import torch.nn.functional as F

    from tinyllm.checkpoint import model_from_checkpoint
    from tinyllm.data.datamodule import TokenBinDataModule

    run_dir = tmp_path / "run"
    train_in_process([*base(corpus, data_root), "trainer.precision=bf16-true"], run_dir)
    m = json.loads((run_dir / "metrics.json").read_text())
    ckpt = read_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    model = model_from_checkpoint(ckpt).to(torch.bfloat16).eval()
    (folder,) = {p.parent for p in Path(data_root).glob("*/meta.json")}
    dm = TokenBinDataModule(
        folder, block_size=model.config.block_size, batch_size=8, val_windows=16
    )  # fmt: skip (as TINY: loader.val_windows=16)
    nll, n = 0.0, 0
    with torch.no_grad():
        for x, y in dm.val_dataloader():
            logits = model(x).double()
            nll += float(F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum"))
            n += y.numel()
    assert m["val/loss"] == pytest.approx(nll / n, rel=1e-6, abs=0)


# ------------------------------------------------------------------ signals and kills
def _start_training(corpus, data_root, run_dir: Path, *extra: str):
    import os
    import subprocess
    import sys

    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    for k in ("LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT", "NODE_RANK", "RANK"):
        env.pop(k, None)
    args = [*base(corpus, data_root), "trainer.max_steps=100000",
            "trainer.enable_progress_bar=false", "sample.max_new_tokens=0", *extra]  # fmt: skip
    cmd = [sys.executable, "-m", "tinyllm.train", *args, f"hydra.run.dir={run_dir}"]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=run_dir.parent)  # fmt: skip


def _wait_for_file(proc, path: Path, timeout: float = 240.0) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.1)


def _ckpt_step(path: Path) -> int:
    return int(torch.load(path, weights_only=True)["global_step"])


def test_sigterm_finishes_the_step_saves_and_exits_143(corpus, data_root, tmp_path):
    """SIGTERM used to end a run with exit code 0, status failed ('SIGTERMException: ') and
    no checkpoint of the steps since the last validation."""
    import json
    import signal
    import time

    train_in_process(base(corpus, data_root), tmp_path / "warm")  # (prepares the data)
    run_dir = tmp_path / "run"
    proc = _start_training(corpus, data_root, run_dir)
    _wait_for_file(proc, run_dir / "metrics.json")  # (the first heartbeat: training runs)
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    m = json.loads((run_dir / "metrics.json").read_text())
    assert m["status"] == "interrupted" and m["signal"] == "SIGTERM", m
    last = run_dir / "checkpoints" / "last.ckpt"
    assert m["step"] > 0 and _ckpt_step(last) == m["step"]
    assert f"ckpt_path={last.resolve()}" in m["resume"] and m["resume"] in out
    assert "Traceback" not in err


@pytest.mark.slow
def test_sigint_saves_exits_130_and_the_printed_command_resumes(corpus, data_root, tmp_path):
    import json
    import shlex
    import signal
    import subprocess
    import sys
    import time

    train_in_process(base(corpus, data_root), tmp_path / "warm")
    run_dir = tmp_path / "run"
    proc = _start_training(corpus, data_root, run_dir)
    _wait_for_file(proc, run_dir / "metrics.json")
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    m = json.loads((run_dir / "metrics.json").read_text())
    assert m["status"] == "interrupted" and m["signal"] == "SIGINT"
    # the printed command, with a nearer end so the test finishes
    args = shlex.split(m["resume"])[3:]
    args = [a for a in args if not a.startswith("trainer.max_steps=")]
    stop = m["step"] + 2
    assert shlex.split(m["resume"])[:3] == ["python", "-m", "tinyllm.train"]
    r = subprocess.run([sys.executable, "-m", "tinyllm.train", *args, f"trainer.max_steps={stop}",
                        f"hydra.run.dir={tmp_path / 'resumed'}"],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert _ckpt_step(tmp_path / "resumed" / "checkpoints" / "last.ckpt") == stop


def test_a_second_ctrl_c_stops_at_once():
    import subprocess
    import sys

    code = ("import signal\nfrom tinyllm.stopping import LastCheckpoint\n"
            "c = LastCheckpoint('last.ckpt')\nc._on_signal(signal.SIGINT, None)\n"
            "print('first: stopping after the step')\nc._on_signal(signal.SIGINT, None)\n"
            "print('survived the second')\n")  # fmt: skip
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == -2 and "first" in r.stdout and "survived" not in r.stdout


def test_kill_9_loses_at_most_every_n_minutes_and_the_run_reads_stale(corpus, data_root, tmp_path):
    """kill -9 cannot be caught: checkpoint.every_n_minutes bounds the loss by time, and the
    run's pid/heartbeat let report call it stale instead of running forever."""
    import json
    import signal

    from tinyllm.analysis.sweep import is_stale

    train_in_process(base(corpus, data_root), tmp_path / "warm")
    run_dir = tmp_path / "run"
    proc = _start_training(
        corpus,
        data_root,
        run_dir,
        "trainer.val_check_interval=5000",
        "checkpoint.every_n_minutes=0.005",
    )  # fmt: skip (0.3 s)
    _wait_for_file(proc, run_dir / "checkpoints" / "last.ckpt")
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert 0 < _ckpt_step(run_dir / "checkpoints" / "last.ckpt") < 5000  # (no validation yet)
    m = json.loads((run_dir / "metrics.json").read_text())
    assert m["status"] == "running" and m["pid"] == proc.pid and is_stale(m)


@pytest.mark.slow
def test_disk_full_during_training_is_one_clear_error(corpus, data_root, tmp_path):
    """The run folder on a 1.1 MB tmpfs: the second last.ckpt (480 kB) does not fit beside the
    first and best.ckpt. One paragraph, exit 2 (the unit test above checks that the previous
    last.ckpt survives; this folder goes with its mount namespace)."""
    import os
    import shutil
    import subprocess
    import sys

    if not shutil.which("unshare"):
        pytest.skip("needs unshare (util-linux)")
    train_in_process(base(corpus, data_root), tmp_path / "warm")  # (prepares the data)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    args = [*base(corpus, data_root), "sample.max_new_tokens=0",
            "trainer.enable_progress_bar=false"]  # fmt: skip
    mount = 'mount -t tmpfs -o size=1100k tmpfs "$0" && cd "$0" && exec "$@"'
    r = subprocess.run(["unshare", "-rm", "sh", "-c", mount, str(mnt), sys.executable, "-m",
                        "tinyllm.train", *args, "logger=none",
                        f"hydra.run.dir={mnt}/run"], env=env, capture_output=True, text=True,
                       timeout=300)  # fmt: skip
    if "mount:" in r.stderr or "unshare:" in r.stderr:
        pytest.skip(f"cannot mount a small tmpfs here: {r.stderr.strip()[-200:]}")
    assert r.returncode == 2, r.stderr[-3000:]
    assert f"error: disk full at {mnt}/run/checkpoints/" in r.stderr
    assert "Traceback" not in r.stderr and "inline_container" not in r.stderr


def test_training_start_removes_temporaries_of_killed_writes_only(
    corpus, data_root, tmp_path, monkeypatch
):
    """Killed checkpoint writes left .last.ckpt.<random>.tmp files forever (9 over 16 kills)."""
    import json
    import os
    import time

    import tinyllm.train as train

    ckpts = tmp_path / "run" / "checkpoints"
    ckpts.mkdir(parents=True)
    dead = ckpts / ".last.ckpt.4000000.0123abcd.tmp"  # (no such pid)
    legacy = ckpts / ".last.ckpt.k2_x9q1z.tmp"  # (mkstemp's name: no pid)
    live = ckpts / f".best.ckpt.{os.getpid()}.tmp"  # (a live writer's)
    for p in (dead, legacy, live):
        p.write_bytes(b"partial")
    old = time.time() - 2 * 3600
    os.utime(legacy, (old, old))
    train_in_process(base(corpus, data_root), tmp_path / "run")
    assert not dead.exists() and not legacy.exists() and live.exists()
    # only the process that was rank zero at start marks the run failed
    monkeypatch.setattr(train, "_RANK_ZERO", False)
    train._write_failed("a worker's error")
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["status"] == "completed"
    monkeypatch.setattr(train, "_RANK_ZERO", True)
    train._write_failed("rank zero's error")
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["status"] == "failed"


def test_validation_set_is_bounded_and_fixed_by_default(tmp_path):
    """Every window of the val split was the default: 530 of 538 s went to validation."""
    from hydra import compose, initialize_config_dir
    from train_utils import CONF

    from tinyllm.data.datamodule import ValBatches
    from tinyllm.train import VAL_TOKENS, _val_size, _val_windows

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train")
    assert cfg.loader.val_windows == "auto"
    assert _val_windows("auto", 1024) * 1024 == VAL_TOKENS == _val_windows("auto", 64) * 64
    assert _val_windows("all", 64) is None and _val_windows(7, 64) == 7
    with pytest.raises(TinyLLMError, match="loader.val_windows"):
        _val_windows("most", 64)
    # a split of 100k windows of 8 tokens: 2^17 windows asked, all 100k used; evenly spaced
    np.arange(800_001, dtype=np.uint16).tofile(tmp_path / "val.bin")
    ds = ValBatches(tmp_path / "val.bin", "uint16", 8, 4, num_windows=1000)
    gaps = np.diff(ds.all_starts)
    assert len(ds.all_starts) == 1000 and gaps.min() >= 8 * 99 and gaps.max() <= 8 * 101
    meta = {"splits": {"val": {"tokens": 800_001}}}
    assert "scores 1,000 of the 100,000 windows" in _val_size(meta, 8, 1000)


def _small_folder(tmp_path: Path) -> Path:
    from tinyllm.data.prepare import prepare_data

    (tmp_path / "c").mkdir()
    for i in range(6):
        (tmp_path / "c" / f"{i}.txt").write_text(TEXT[i * 7 :] * 3)
    return prepare_data({"source": "text", "path": str(tmp_path / "c")}, {"vocab_size": 300},
                        tmp_path / "o", num_workers=1)  # fmt: skip


def test_a_bin_with_ids_beyond_the_vocabulary_is_a_clear_error(tmp_path):
    """It crashed inside the model with 'IndexError: index out of range in self'."""
    import json

    out = _small_folder(tmp_path)
    meta = json.loads((out / "meta.json").read_text())
    n = meta["splits"]["train"]["tokens"]
    np.full(n, 400, dtype=meta["dtype"]).tofile(out / "train.bin")  # same size, foreign ids
    with pytest.raises(TinyLLMError, match=r"train.bin holds token id 400.*300 ids"):
        train_in_process([*TINY, f"data_dir={out}", "model.block_size=16"], tmp_path / "run")


def test_bins_replaced_during_a_run_are_refused_not_mixed_in(tmp_path):
    import os
    import shutil

    from tinyllm.data.datamodule import TokenBinDataModule

    out = _small_folder(tmp_path)
    dm = TokenBinDataModule(out, block_size=16, batch_size=2)
    train = dm.train_dataset()
    before = train.rows(0).copy()  # (opened: the map holds the file it saw)
    for split in ("train", "val"):  # another prepare renames new bins in
        shutil.copy(out / f"{split}.bin", tmp_path / "new.bin")
        os.replace(tmp_path / "new.bin", out / f"{split}.bin")
    assert (train.rows(0) == before).all()
    with pytest.raises(TinyLLMError, match="val.bin was replaced while this run was using it"):
        dm.val_dataset().rows(0)


@pytest.mark.ddp
@pytest.mark.slow
def test_sigterm_to_rank_zero_stops_both_ddp_ranks_cleanly(corpus, data_root, tmp_path):
    """Rank 0 alone gets SIGTERM; the ranks agree within 10 steps (one all-reduce), save once
    and stop together: no rank left waiting in a collective."""
    import json
    import signal
    import time

    train_in_process(base(corpus, data_root), tmp_path / "warm")
    run_dir = tmp_path / "run"
    proc = _start_training(corpus, data_root, run_dir, "trainer.devices=2", "logger=none")
    _wait_for_file(proc, run_dir / "metrics.json")
    time.sleep(2.0)
    kids = _children(proc.pid)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 143, err[-3000:]
    m = json.loads((run_dir / "metrics.json").read_text())
    assert m["status"] == "interrupted" and m["step"] % 10 == 0
    assert _ckpt_step(run_dir / "checkpoints" / "last.ckpt") == m["step"]
    deadline = time.monotonic() + 30
    while any(_running(k) for k in kids) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [k for k in kids if _running(k)]
