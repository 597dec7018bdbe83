"""Agreement, offline: tinyllm.evaluate, the harness with our model class, and the harness's
own `hf` model on `tinyllm.export` output score a local JSONL task identically."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval")
pytest.importorskip("transformers")

from tinyllm.checkpoint import save_checkpoint  # noqa: E402
from tinyllm.eval.multiple_choice import score_items, summarize  # noqa: E402
from tinyllm.eval.scoring import Scorer  # noqa: E402
from tinyllm.eval.tasks import load_task  # noqa: E402
from tinyllm.model import GPT, ModelConfig  # noqa: E402
from tinyllm.tokenizer import BPETokenizer  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TASK = REPO / "examples" / "tasks" / "agreement.jsonl"
TEXT = "The kings are here. The king is here. Her brothers have gone. 12 + 7 = 19. " * 20


@pytest.fixture(scope="module")
def llama_ckpt(tmp_path_factory):
    """A Llama-style model (exportable) with random weights everywhere, and its checkpoint."""
    tok = BPETokenizer.train(TEXT, vocab_size=294, special_tokens=["<|endoftext|>"])
    cfg = ModelConfig(
        vocab_size=tok.vocab_size,
        block_size=32,
        n_layer=2,
        n_head=4,
        n_kv_head=2,
        n_embd=32,
        norm="rmsnorm",
        activation="swiglu",
        pos="rope",
        bias=False,
    )
    torch.manual_seed(0)
    model = GPT(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    path = tmp_path_factory.mktemp("ckpt") / "m.ckpt"
    save_checkpoint(path, model, tok)
    return path, model, tok


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def compose_eval(overrides: list[str]):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose("evaluate", overrides=overrides)


def native(model, tok):
    task = load_task(str(TASK))
    scores = score_items(Scorer(model, tok), task.items)
    return summarize(scores), [s.loglikelihoods for s in scores]


def test_model_class_requests(llama_ckpt) -> None:
    """The three request kinds, called as the harness calls them, against brute force."""
    from lm_eval.api.instance import Instance

    from tinyllm.eval.harness import TinyLLMLM

    path, model, tok = llama_ckpt
    lm = TinyLLMLM(model=model, tokenizer=tok, batch_size=3)
    # how lm_eval.simple_evaluate(model="tinyllm", model_args="ckpt=...") builds it
    made = TinyLLMLM.create_from_arg_string(
        f"ckpt={path}", {"batch_size": None, "max_batch_size": None, "device": None}
    )
    assert made.max_length == 32 and made.scorer.batch_size == 16

    def inst(kind, args):
        return Instance(request_type=kind, doc={}, arguments=args, idx=0)

    def logp(ids: list[int]) -> list[float]:  # log p(ids[t] | ids[:t]) for t >= 1
        with torch.no_grad():
            logits = model(torch.tensor([ids]))[0].double().log_softmax(-1)
        return [logits[t - 1, ids[t]].item() for t in range(1, len(ids))]

    pairs = [("The king ", "is here."), ("Her brothers", " have gone."), ("", "The")]
    got = lm.loglikelihood([inst("loglikelihood", p) for p in pairs])
    for (ctx, cont), (ll, _) in zip(pairs, got):
        ids = [tok.eos_id] if not ctx else tok.encode(ctx.rstrip())
        whole = tok.encode(ctx + cont) if ctx else [tok.eos_id, *tok.encode(cont)]
        n = len(whole) - len(ids)
        assert ll == pytest.approx(sum(logp(whole)[-n:]), abs=1e-4)
    text = TEXT[:60]  # shorter than the window: one window, EOS first
    (rolled,) = lm.loglikelihood_rolling([inst("loglikelihood_rolling", (text,))])
    assert rolled == pytest.approx(sum(logp([tok.eos_id, *tok.encode(text)])), abs=1e-4)
    (gen,) = lm.generate_until([inst("generate_until", ("The king", {"until": ["."]}))])
    assert isinstance(gen, str) and "." not in gen


@pytest.mark.slow
def test_evaluate_command_and_harness_with_our_class_agree(llama_ckpt) -> None:
    from tinyllm.evaluate import run

    path, _, _ = llama_ckpt
    res = run(compose_eval([f"ckpt={path}", f"tasks=[{TASK}]", f"harness_tasks=[{TASK}]"]))
    ours, harness = res["tasks"]["agreement"], res["harness"]
    (name,) = harness["tasks"]
    theirs = harness["results"][name]
    assert theirs["acc,none"] == pytest.approx(ours["acc"], abs=1e-12)
    assert theirs["acc_norm,none"] == pytest.approx(ours["acc_norm"], abs=1e-12)
    assert len(harness["per_item"][name]) == len(ours["per_item"]) == 48
    for a, b in zip(harness["per_item"][name], ours["per_item"]):
        assert a == pytest.approx(b["loglikelihoods"], abs=1e-4)


@pytest.mark.slow
def test_harness_hf_model_on_exported_weights_agrees(llama_ckpt, tmp_path) -> None:
    import lm_eval
    from lm_eval.tasks import TaskManager

    from tinyllm.eval.harness import write_task_yaml
    from tinyllm.export import run as export

    path, model, tok = llama_ckpt
    export(str(path), str(tmp_path / "hf"))
    m, lls = native(model, tok)
    name = write_task_yaml(TASK, tmp_path)
    res = lm_eval.simple_evaluate(
        model="hf",
        model_args=f"pretrained={tmp_path / 'hf'},dtype=float32,device=cpu",
        tasks=[name],
        task_manager=TaskManager(include_path=str(tmp_path)),
        log_samples=True,
        batch_size=8,
    )
    theirs = res["results"][name]
    assert theirs["acc,none"] == pytest.approx(m["acc"], abs=1e-12)
    assert theirs["acc_norm,none"] == pytest.approx(m["acc_norm"], abs=1e-12)
    samples = sorted(res["samples"][name], key=lambda s: int(s["doc_id"]))
    assert len(samples) == len(lls)
    for s, ours in zip(samples, lls):
        assert [float(r[0]) for r in s["filtered_resps"]] == pytest.approx(ours, abs=1e-4)
