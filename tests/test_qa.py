"""Q&A fine-tuning data: parsing, errors, the chat template's loss mask, batching, and a nano
model that learns to answer its training questions and stop."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from tinyllm.chat import ChatTemplate
from tinyllm.data.protocol import DataSettings, TrainingData
from tinyllm.data.qa import (
    IGNORE_INDEX,
    ExactMatchCallback,
    QADataModule,
    _Shard,
    collate_qa,
    exact_match,
    greedy_answer,
    load_qa_records,
    split_records,
    train_qa_tokenizer,
)
from tinyllm.errors import TinyLLMError
from tinyllm.tokenizer import BPETokenizer

PAIRS = [
    {"id": 1, "category": "Identity", "question": "Who are you?", "answer": "I am TinyLLM."},
    {"question": "What is your name?", "answer": "My name is TinyLLM."},
    {"question": "What is two plus two?", "answer": "Four."},
    {"question": "Who made you?", "answer": "I was trained with tinyllm."},
    {"question": "Goodbye.", "answer": "Goodbye, and happy training!"},
]
CHAT = {
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi."},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Who are you?"},
        {"role": "assistant", "content": "TinyLLM."},
    ]
}


@pytest.fixture(scope="module")
def tok() -> BPETokenizer:
    return train_qa_tokenizer([*PAIRS, CHAT], 300)


def write(tmp_path: Path, text: str, name: str = "qa.json") -> Path:
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return p


def masked_text(tok: BPETokenizer, ids: list[int], mask: list[bool]) -> str:
    return tok.decode([i for i, m in zip(ids, mask) if m])


# ---------------------------------------------------------------------------- parsing


def test_parse_json_array_and_jsonl(tmp_path: Path) -> None:
    arr = load_qa_records(write(tmp_path, json.dumps(PAIRS, indent=2)))
    jsonl = "\n".join(json.dumps(r) for r in [*PAIRS, CHAT]) + "\n\n"
    lines = load_qa_records(write(tmp_path, jsonl, "qa.jsonl"))
    assert len(arr) == 5 and len(lines) == 6
    assert arr == lines[:5]
    assert arr[0]["messages"] == [
        {"role": "user", "content": "Who are you?"},
        {"role": "assistant", "content": "I am TinyLLM."},
    ]
    assert arr[0]["id"] == 1 and "category" not in arr[0]
    assert lines[5]["messages"] == CHAT["messages"]


def test_example_file_loads(repo_root: Path) -> None:
    recs = load_qa_records(repo_root / "examples" / "qa_tiny.json")
    assert len(recs) >= 30


@pytest.mark.parametrize(
    "text, needles",
    [
        ("", ["empty"]),
        ("  \n", ["empty"]),
        ("[]", ["no records"]),
        ('[{"question": "a", "answer": "b"},\n {"question": "c"]', ["line 2", "column"]),
        (
            '[{"question": "a", "answer": "b"},\n {"question": "c"}]',
            ["record 2", "line 2", "answer"],
        ),
        ('[{"answer": "b"}]', ["record 1", "question"]),
        ('[{"id": 7, "question": "a", "answer": 42}]', ["record 1", "id 7", "answer", "int"]),
        ('[{"question": ["a"], "answer": "b"}]', ["question", "list"]),
        ('[{"question": "a", "answer": "  "}]', ["answer", "empty"]),
        ('["just a string"]', ["record 1", "object"]),
        ('{"question": "a", "answer": "b"}\n\n{"question": "c", "answer": }\n', ["line 3"]),
        ('{"question": "a", "answer": "b"}\n{"question": "c"}\n', ["record 2", "line 2"]),
        ('{"messages": [{"role": "bot", "content": "x"}]}', ["line 1", "message 1", "bot"]),
        ('{"messages": [{"role": "user", "content": 3}]}', ["message 1", "content", "int"]),
        ('{"messages": [{"role": "user", "content": "x"}]}', ["no `assistant`"]),
        ('{"messages": []}', ["messages"]),
        ('{"a": 1,\n "b": 2}', ["line 1", "JSON array"]),
    ],
)
def test_bad_input_names_record_and_fix(tmp_path: Path, text: str, needles: list[str]) -> None:
    path = write(tmp_path, text)
    with pytest.raises(TinyLLMError) as e:
        load_qa_records(path)
    msg = str(e.value)
    assert str(path) in msg and "Fix" in msg
    for n in needles:
        assert n in msg, (n, msg)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(TinyLLMError, match="does not exist"):
        load_qa_records(tmp_path / "nope.json")


# ---------------------------------------------------------------------------- template


def test_mask_covers_exactly_answer_and_eos(tok: BPETokenizer) -> None:
    t = ChatTemplate()
    ids, mask = t.encode_example(tok, PAIRS[0])
    assert len(ids) == len(mask)
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id and ids.count(tok.eos_id) == 1
    assert tok.decode(ids) == "<|bos|>Question: Who are you?\nAnswer: I am TinyLLM.<|eos|>"
    assert masked_text(tok, ids, mask) == " I am TinyLLM.<|eos|>"
    # the mask is one contiguous run at the end; everything before it is the prompt
    first = mask.index(True)
    assert all(mask[first:]) and not any(mask[:first])
    assert t.encode_prompt(tok, "Who are you?") == ids[:first]
    assert tok.decode(ids[:first]).endswith("Answer:")


@pytest.mark.parametrize(
    "question, answer",
    [
        ("What is <|eos|>?", "A special token, not text: <|eos|> <|bos|>."),
        ("Multi\nline?", "Yes.\nTwo lines.\n"),
        ("Ünïcödé — 你好?", "  Leading spaces, emoji 🙂 and Answer: inside."),
        ("Question: nested?", "Answer: nested."),
    ],
)
def test_prompt_is_prefix_and_mask_is_answer(tok: BPETokenizer, question: str, answer: str) -> None:
    t = ChatTemplate()
    ids, mask = t.encode_example(tok, {"question": question, "answer": answer})
    assert ids.count(tok.eos_id) == 1 and ids.count(tok.bos_id) == 1  # text is never special
    assert masked_text(tok, ids, mask) == f" {answer}<|eos|>"
    prompt = t.encode_prompt(tok, question)
    n = len(prompt)
    assert ids[:n] == prompt and all(mask[n:]) and not any(mask[:n])
    assert t.decode_answer(tok, ids[len(prompt) :]) == answer


def test_multi_turn_masks_every_answer(tok: BPETokenizer) -> None:
    t = ChatTemplate()
    ids, mask = t.encode_example(tok, CHAT)
    assert tok.decode(ids) == (
        "<|bos|>System: Be brief.\nQuestion: Hi.\nAnswer: Hello.<|eos|>"
        "Question: Who are you?\nAnswer: TinyLLM.<|eos|>"
    )
    assert masked_text(tok, ids, mask) == " Hello.<|eos|> TinyLLM.<|eos|>"
    # a chat history as the prompt ends where the last answer begins
    prompt = t.encode_prompt(tok, CHAT["messages"][:-1])
    first_of_last = len(ids) - 1 - mask[::-1].index(False)
    assert prompt == ids[: first_of_last + 1]
    with pytest.raises(TinyLLMError, match="ends with an assistant"):
        t.encode_prompt(tok, CHAT["messages"])


def test_custom_template_and_round_trip(tok: BPETokenizer) -> None:
    t = ChatTemplate(user_prefix="Q: ", assistant_prefix="A:", assistant_suffix=" Done.")
    ids, mask = t.encode_example(tok, PAIRS[2])
    assert tok.decode(ids) == "<|bos|>Q: What is two plus two?\nA: Four. Done.<|eos|>"
    assert masked_text(tok, ids, mask) == " Four. Done.<|eos|>"
    assert t.decode_answer(tok, [i for i, m in zip(ids, mask) if m]) == "Four."
    d = json.loads(json.dumps(t.to_dict()))  # JSON-able, so it can live in a checkpoint
    assert ChatTemplate.from_dict(d) == t
    assert ChatTemplate.coerce(json.dumps(d)) == t and ChatTemplate.coerce(None) == ChatTemplate()
    with pytest.raises(TinyLLMError, match="user_prefx"):
        ChatTemplate.from_dict({"user_prefx": "Q: "})
    with pytest.raises(TinyLLMError, match="must be a str"):
        ChatTemplate.from_dict({"user_prefix": 3})


def test_tokenizer_without_specials_is_refused() -> None:
    plain = BPETokenizer.train(["Question: hi\nAnswer: ho"], 260, special_tokens=[])
    with pytest.raises(TinyLLMError, match="init_from"):
        ChatTemplate().encode_example(plain, PAIRS[0])
    with pytest.raises(TinyLLMError, match="special"):
        ChatTemplate().encode_prompt(plain, "hi")


def test_gpt2_style_endoftext_is_bos_eos_and_pad(tmp_path: Path) -> None:
    # GPT-2's ranks have one special, <|endoftext|>, as both bos and eos, and no pad token
    text = [ChatTemplate().render_text(p) for p in PAIRS]
    one = BPETokenizer.train(text, 280, special_tokens=["<|endoftext|>"])
    assert one.bos_id == one.eos_id and one.pad_id is None
    ids, mask = ChatTemplate().encode_example(one, PAIRS[0])
    assert masked_text(one, ids, mask) == " I am TinyLLM.<|endoftext|>"
    dm = QADataModule(write(tmp_path, json.dumps(PAIRS)), one, 64, 8, val_count=0)
    assert dm.pad_id == one.eos_id  # padding is never a target, so eos pads as well
    x, y = next(iter(dm.train_dataloader()))
    assert ((y != IGNORE_INDEX).sum(dim=1) > 0).all()


# ---------------------------------------------------------------------------- batching


def test_padded_batches_mask_prompt_and_padding(tmp_path: Path, tok: BPETokenizer) -> None:
    path = write(tmp_path, json.dumps(PAIRS))
    dm = QADataModule(path, tok, block_size=64, batch_size=8, val_count=0)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == y.shape and x.shape[0] == 5 and x.dtype == y.dtype == torch.long
    for xi, yi in zip(x.tolist(), y.tolist()):
        assert xi[0] == tok.bos_id  # every example starts with bos
        text = tok.decode([t for t in yi if t != IGNORE_INDEX])
        assert text.startswith(" ") and text.endswith("<|eos|>") and text.count("<|eos|>") == 1
        assert "Question" not in text and "Answer" not in text
    # a kept target is the next input token (where that input is inside the padded row)
    keep = (y[:, :-1] != IGNORE_INDEX) & (x[:, 1:] != tok.pad_id)
    assert keep.any() and torch.equal(y[:, :-1][keep], x[:, 1:][keep])
    answers = sorted(tok.decode([t for t in r if t != IGNORE_INDEX]) for r in y.tolist())
    assert answers == sorted(f" {p['answer']}<|eos|>" for p in PAIRS)
    # padding: x is padded with pad_id and never a target
    pad_rows = (x == tok.pad_id).any(dim=1)
    assert pad_rows.any()
    assert (y[x == tok.pad_id] == IGNORE_INDEX).all()


def test_collate_pads_to_longest() -> None:
    a = (torch.tensor([1, 2, 3]), torch.tensor([-100, 3, 4]))
    b = (torch.tensor([5]), torch.tensor([6]))
    x, y = collate_qa([a, b], pad_id=0)
    assert x.tolist() == [[1, 2, 3], [5, 0, 0]]
    assert y.tolist() == [[-100, 3, 4], [6, -100, -100]]


def test_packing(tmp_path: Path, tok: BPETokenizer) -> None:
    path = write(tmp_path, json.dumps(PAIRS))
    dm = QADataModule(path, tok, block_size=48, batch_size=8, val_count=0, pack=True)
    loose = QADataModule(path, tok, block_size=48, batch_size=8, val_count=0, pack=False)
    assert len(dm.train_dataset) < len(loose.train_dataset)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (len(dm.train_dataset), 48)
    # packed windows hold the same trained targets as the padded examples, nothing more
    got = sorted(t for t in y.flatten().tolist() if t != IGNORE_INDEX)
    lx, ly = next(iter(loose.train_dataloader()))
    want = sorted(t for t in ly.flatten().tolist() if t != IGNORE_INDEX)
    assert got == want
    assert (y[x == tok.pad_id] == IGNORE_INDEX).all()
    assert (x == tok.bos_id).sum() == len(PAIRS)


def test_truncation_warns_and_counts(tmp_path: Path, tok: BPETokenizer) -> None:
    long = {"question": "Who?", "answer": "TinyLLM " * 40}
    path = write(tmp_path, json.dumps([*PAIRS, long]))
    block = max(len(ChatTemplate().encode_example(tok, p)[0]) for p in PAIRS)  # all fit
    with pytest.warns(UserWarning, match="1 example"):
        dm = QADataModule(path, tok, block_size=block, batch_size=8, val_count=0)
    assert dm.stats["train"]["truncated"] == 1 and dm.stats["train"]["examples"] == 6
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape[1] == block and (y != IGNORE_INDEX).any(dim=1).all()
    with pytest.raises(TinyLLMError, match="block_size"):
        QADataModule(path, tok, block_size=4, batch_size=8, val_count=0)


def test_val_split_deterministic_and_disjoint(tmp_path: Path, tok: BPETokenizer) -> None:
    recs = [{"question": f"q{i}?", "answer": f"a{i}."} for i in range(50)]
    tr1, va1 = split_records(recs, val_fraction=0.2, seed=3)
    tr2, va2 = split_records(recs, val_fraction=0.2, seed=3)
    _, va3 = split_records(recs, val_fraction=0.2, seed=4)
    assert (tr1, va1) == (tr2, va2) and va1 != va3
    assert len(va1) == 10 and len(tr1) == 40
    key = [r["question"] for r in va1]
    assert not set(key) & {r["question"] for r in tr1}
    assert len(split_records(recs, val_count=7)[1]) == 7
    assert len(split_records(recs[:3], val_fraction=0.1)[1]) == 1  # at least one when asked
    assert split_records(recs, val_fraction=0.0)[1] == []
    with pytest.raises(TinyLLMError, match="val_count"):
        split_records(recs[:3], val_count=3)
    path = write(tmp_path, json.dumps(recs))
    dm = QADataModule(path, tok, block_size=32, batch_size=4, val_fraction=0.2, seed=3)
    assert [r["messages"][0]["content"] for r in dm.val_records] == key
    assert len(dm.val_dataset) == 10 and len(dm.train_dataset) == 40
    assert dm.meta["splits"]["val"]["documents"] == 10 and dm.meta["splits"]["val"]["tokens"] > 0
    assert dm.meta["chat_template"] == ChatTemplate().to_dict()
    # under DDP each rank validates a disjoint shard, together every example once
    shards = [list(_Shard(len(dm.val_dataset), r, 3)) for r in range(3)]
    assert sorted(i for sh in shards for i in sh) == list(range(10))
    dm.check_compatible({"vocab_size": tok.vocab_size, "block_size": 32})
    with pytest.raises(TinyLLMError, match="vocab_size"):
        dm.check_compatible({"vocab_size": 10, "block_size": 32})
    assert isinstance(dm, TrainingData)  # the one protocol train.py relies on


def test_train_order_is_seeded_per_epoch(tmp_path: Path, tok: BPETokenizer) -> None:
    recs = [{"question": f"q{i}?", "answer": f"a{i}."} for i in range(20)]
    path = write(tmp_path, json.dumps(recs))

    def order(seed: int, epoch: int) -> list[list[int]]:
        dm = QADataModule(path, tok, block_size=32, batch_size=4, val_count=0, seed=seed)
        dl = dm.train_dataloader()
        dl.sampler.set_epoch(epoch)  # what Lightning does at the start of every epoch
        return [x[:, :8].tolist() for x, _ in dl]

    assert order(0, 0) == order(0, 0) and order(0, 1) == order(0, 1)  # reproducible (resume)
    assert order(0, 0) != order(0, 1) and order(0, 0) != order(1, 0)  # reshuffled per epoch


def test_from_config(tmp_path: Path, tok: BPETokenizer) -> None:
    from tinyllm.checkpoint import save_checkpoint
    from tinyllm.model import GPT, ModelConfig

    path = write(tmp_path, json.dumps(PAIRS))
    cfg = {"path": str(path), "val_count": 1, "pack": False, "template": {"user_prefix": "Q: "}}
    settings = DataSettings(block_size=64, batch_size=2, seed=0, tokenizer={"vocab_size": 280})
    # no tokenizer given: one is trained on the file, by prepare's code and the `tokenizer` group
    scratch = QADataModule.from_config(settings, **cfg)
    assert scratch.template.user_prefix == "Q: " and len(scratch.val_records) == 1
    assert scratch.tokenizer.vocab_size <= 280 and scratch.tokenizer.eos_id is not None
    assert scratch.meta["tokenizer_sha256"] == scratch.tokenizer.sha256()
    assert scratch.meta["vocab_size"] == scratch.tokenizer.vocab_size
    assert [type(c).__name__ for c in scratch.callbacks()] == ["ExactMatchCallback"]
    # fine-tuning: the checkpoint's tokenizer
    ckpt = tmp_path / "m.ckpt"
    save_checkpoint(ckpt, GPT(ModelConfig(vocab_size=tok.vocab_size, n_layer=1, n_head=1,
                                          n_embd=8, block_size=64)), tok)  # fmt: skip
    tuned = QADataModule.from_config(replace(settings, init_from=str(ckpt)), **cfg)
    assert tuned.tokenizer.sha256() == tok.sha256()
    # tokenizer.path: prepare's loader
    tok.save(tmp_path / "tok.json")
    given = replace(settings, tokenizer={"path": str(tmp_path / "tok.json")})
    assert QADataModule.from_config(given, **cfg).tokenizer.sha256() == tok.sha256()
    with pytest.raises(TinyLLMError, match="init_from"):
        QADataModule.from_config(replace(settings, tokenizer={}), **cfg)
    with pytest.raises(TypeError, match="val_fracton"):  # (train.py names the option)
        QADataModule.from_config(settings, **cfg, val_fracton=0.2)
    with pytest.raises(TinyLLMError, match="data.path"):
        QADataModule.from_config(settings, **{**cfg, "path": None})


# ---------------------------------------------------------------------------- end to end


def _fit_nano(tok: BPETokenizer, path: Path, steps: int) -> torch.nn.Module:
    from tinyllm.model import GPT, ModelConfig

    torch.manual_seed(0)
    dm = QADataModule(path, tok, block_size=64, batch_size=len(PAIRS), val_count=0)
    model = GPT(
        ModelConfig(vocab_size=tok.vocab_size, block_size=64, n_layer=2, n_head=2, n_embd=64)
    )
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    x, y = next(iter(dm.train_dataloader()))  # the whole (tiny) training set is one batch
    model.train()
    for _ in range(steps):
        logits = model(x)  # (B, T, V)
        loss = torch.nn.functional.cross_entropy(
            logits.view(-1, logits.size(-1)), y.view(-1), ignore_index=IGNORE_INDEX
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model


def test_nano_model_learns_to_answer_and_stop(tmp_path: Path, tok: BPETokenizer) -> None:
    path = write(tmp_path, json.dumps(PAIRS))
    model = _fit_nano(tok, path, steps=150)
    for p in PAIRS:
        answer, stopped = greedy_answer(model, tok, p["question"], max_new_tokens=40)
        assert answer == p["answer"] and stopped, (p, answer)
    assert exact_match(model, tok, PAIRS) == 1.0
    # without the KV cache (a budget beyond the block) the same greedy answers come out
    assert exact_match(model, tok, PAIRS, max_new_tokens=60) == 1.0
    # a wrong reference is not matched
    assert exact_match(model, tok, [{"question": "Who are you?", "answer": "Nobody."}]) == 0.0


@pytest.mark.parametrize("val_count", [0, 2])
def test_datamodule_in_a_lightning_fit(tmp_path: Path, tok: BPETokenizer, val_count: int) -> None:
    import lightning as L

    from tinyllm.model import GPT, ModelConfig

    class Tiny(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            cfg = ModelConfig(
                vocab_size=tok.vocab_size, block_size=64, n_layer=1, n_head=2, n_embd=32
            )
            self.model = GPT(cfg)
            self.val_targets = 0

        def _loss(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
            x, y = batch
            logits = self.model(x)  # (B, T, V)
            return torch.nn.functional.cross_entropy(
                logits.view(-1, logits.size(-1)), y.view(-1), ignore_index=IGNORE_INDEX
            )

        def training_step(self, batch, batch_idx):  # noqa: ANN001, ANN201
            return self._loss(batch)

        def validation_step(self, batch, batch_idx):  # noqa: ANN001, ANN201
            self.val_targets += int((batch[1] != IGNORE_INDEX).sum())
            self.log("val/loss", self._loss(batch))

        def configure_optimizers(self):  # noqa: ANN201
            return torch.optim.SGD(self.parameters(), lr=0.1)

    path = write(tmp_path, json.dumps(PAIRS))
    dm = QADataModule(path, tok, block_size=64, batch_size=2, val_count=val_count)
    em = ExactMatchCallback(dm.val_records, dm.tokenizer, dm.chat_template, max_new_tokens=4)
    model = Tiny()
    trainer = L.Trainer(
        max_steps=4,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        callbacks=[em],
    )
    trainer.fit(model, datamodule=dm)
    assert trainer.global_step == 4
    per_pass = dm.meta["splits"]["val"]["tokens"]  # every validation pass sees all val targets
    if val_count:
        assert per_pass > 0 and model.val_targets > 0 and model.val_targets % per_pass == 0
        assert em.last == 0.0  # an untrained model answers nothing right
        assert "val/exact_match" in trainer.callback_metrics
    else:
        assert per_pass == 0 and model.val_targets == 0 and em.last is None
