"""Question-answer fine-tuning data: load, validate, encode with a chat template, batch.

The file is a JSON array or JSON Lines of records, either a pair

    {"id": 1, "category": "Identity", "question": "Who are you?", "answer": "I am TinyLLM."}

(`id` and `category` are optional and ignored in training) or a conversation

    {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}

Each record becomes one example (see tinyllm/chat.py for the template). Batches are
`(x, y)` LongTensor pairs [B, T] like the pretraining data, except that `y` is -100 (the
cross-entropy `ignore_index`) everywhere but on answer tokens and the `<eos>` after them: the
loss teaches the model to answer, not to ask. Examples are padded per batch to the longest
(`pack=False`) or packed several to a window of `block_size` (`pack=True`, fewer pad tokens;
attention then crosses example boundaries, each example still starts with `<bos>`).

The split into train/val is by record, seeded and deterministic. `val_records` are kept so the
trainer can report `exact_match` of greedy answers on held-out questions.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from tinyllm.chat import (
    IGNORE_INDEX,
    ChatTemplate,
    Message,
    TokenizerLike,
    as_messages,
)
from tinyllm.data.protocol import DataSettings
from tinyllm.data.qa_records import _EXAMPLE, load_qa_records
from tinyllm.errors import TinyLLMError
from tinyllm.io import sha256_file
from tinyllm.sampling import greedy_answer_ids

if TYPE_CHECKING:
    from tinyllm.tokenizer import BPETokenizer

# ---------------------------------------------------------------------------- split/encode


def split_records(
    records: Sequence[Any],
    val_fraction: float = 0.1,
    val_count: int | None = None,
    seed: int = 0,
) -> tuple[list[Any], list[Any]]:
    """Deterministic seeded split by record: (train, val), disjoint, order-stable per seed.

    `val_count` (if given) wins over `val_fraction`. A non-zero fraction keeps at least one
    record in each split when there are two or more records.
    """
    n = len(records)
    if val_count is None:
        if not 0.0 <= val_fraction < 1.0:
            raise TinyLLMError(
                f"data.val_fraction={val_fraction} must be in [0, 1). Fix the override."
            )
        k = round(n * val_fraction)
        if val_fraction > 0 and n >= 2:
            k = min(max(k, 1), n - 1)
    else:
        k = int(val_count)
        if not 0 <= k < n:
            raise TinyLLMError(
                f"data.val_count={val_count} must be in [0, {n - 1}] for {n} records (at least "
                "one record must stay for training). Fix the override."
            )
    order = list(range(n))
    random.Random(seed).shuffle(order)
    val_idx = sorted(order[:k])
    val_set = set(val_idx)
    train = [records[i] for i in order if i not in val_set]
    val = [records[i] for i in val_idx]
    return train, val


def encode_records(
    records: Sequence[Any],
    tokenizer: TokenizerLike,
    template: ChatTemplate,
    block_size: int,
) -> tuple[list[tuple[list[int], list[bool]]], dict[str, int]]:
    """Encode records to (ids, mask), cut to block_size + 1 tokens; return them and counts.

    A window of block_size + 1 tokens gives block_size (input, target) pairs. Examples whose
    answer starts beyond the window (nothing left to learn) are dropped.
    """
    max_len = block_size + 1
    out = []
    stats = {"examples": 0, "truncated": 0, "dropped": 0, "target_tokens": 0}
    for rec in records:
        ids, mask = template.encode_example(tokenizer, rec)
        if len(ids) > max_len:
            ids, mask = ids[:max_len], mask[:max_len]
            stats["truncated"] += 1
        n_targets = sum(mask[1:])
        if n_targets == 0:
            stats["dropped"] += 1
            continue
        out.append((ids, mask))
        stats["examples"] += 1
        stats["target_tokens"] += n_targets
    return out, stats


def _xy(ids: Sequence[int], mask: Sequence[bool]) -> tuple[torch.Tensor, torch.Tensor]:
    """Shift by one: x[t] = ids[t], y[t] = ids[t+1] where that token is trained, else -100."""
    t = torch.tensor(ids, dtype=torch.long)
    m = torch.tensor(mask, dtype=torch.bool)
    x = t[:-1]
    y = torch.where(m[1:], t[1:], torch.full_like(t[1:], IGNORE_INDEX))
    return x, y


class QADataset(Dataset):
    """(x, y) pairs, one per example (padded later, per batch) or one per packed window."""

    def __init__(
        self,
        examples: Sequence[tuple[list[int], list[bool]]],
        block_size: int,
        pad_id: int,
        pack: bool = False,
    ) -> None:
        self.block_size = block_size
        self.pad_id = pad_id
        self.pack = pack
        if pack:
            self.items = [_xy(ids, m) for ids, m in _pack(examples, block_size + 1, pad_id)]
        else:
            self.items = [_xy(ids, m) for ids, m in examples]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.items[i]


def _pack(
    examples: Sequence[tuple[list[int], list[bool]]], max_len: int, pad_id: int
) -> list[tuple[list[int], list[bool]]]:
    """Greedy in-order packing of whole examples into windows of max_len tokens, padded."""
    windows: list[tuple[list[int], list[bool]]] = []
    ids: list[int] = []
    mask: list[bool] = []
    for e_ids, e_mask in examples:
        if ids and len(ids) + len(e_ids) > max_len:
            windows.append((ids, mask))
            ids, mask = [], []
        ids = ids + e_ids
        mask = mask + e_mask
    if ids:
        windows.append((ids, mask))
    # pad every window to max_len; padding is never a target (mask False)
    return [
        (w + [pad_id] * (max_len - len(w)), m + [False] * (max_len - len(m))) for w, m in windows
    ]


def collate_qa(
    batch: Sequence[tuple[torch.Tensor, torch.Tensor]], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad a batch to its longest example: x with pad_id, y with -100 (ignored)."""
    T = max(x.numel() for x, _ in batch)
    x = torch.full((len(batch), T), pad_id, dtype=torch.long)
    y = torch.full((len(batch), T), IGNORE_INDEX, dtype=torch.long)
    for i, (xi, yi) in enumerate(batch):
        x[i, : xi.numel()] = xi
        y[i, : yi.numel()] = yi
    return x, y


class _Collate:
    """Picklable collate (DataLoader workers are spawned on some platforms)."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, batch: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> Any:
        return collate_qa(batch, self.pad_id)


# ---------------------------------------------------------------------------- tokenizer


def train_qa_tokenizer(
    records: Sequence[Any],
    vocab_size: int,
    template: ChatTemplate | Mapping[str, Any] | None = None,
    pattern: str = "gpt4",
) -> BPETokenizer:
    """Train a BPE tokenizer (with the default <|bos|>/<|eos|>/<|pad|> specials) on the
    rendered conversations, for training on Q&A data from scratch."""
    from tinyllm.data.prepare import train_tokenizer

    tmpl = ChatTemplate.coerce(template)
    texts = [tmpl.render_text(r) for r in records]
    return train_tokenizer(texts, {"vocab_size": vocab_size, "pattern": pattern})


# ---------------------------------------------------------------------------- datamodule


class QADataModule(L.LightningDataModule):
    """Q&A fine-tuning data: answer-only targets, padded per batch or packed.

    Everything (reading, validation, the split, encoding) happens in __init__ so a bad file
    fails before a model is built. `tokenizer=None` trains one on the file (`vocab_size`).
    """

    def __init__(
        self,
        path: str | Path,
        tokenizer: BPETokenizer | None,
        block_size: int,
        batch_size: int,
        val_fraction: float = 0.1,
        val_count: int | None = None,
        seed: int = 0,
        pack: bool = False,
        template: ChatTemplate | Mapping[str, Any] | str | None = None,
        num_workers: int = 0,
        vocab_size: int | None = None,
        tokenizer_pattern: str = "gpt4",
        pin_memory: bool | None = None,
    ) -> None:
        super().__init__()
        self.path = Path(path)
        self.block_size = int(block_size)
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.pack = bool(pack)
        self.num_workers = int(num_workers)
        self.pin_memory = pin_memory
        self.template = ChatTemplate.coerce(template)
        self.records = load_qa_records(self.path)
        if tokenizer is None:
            if not vocab_size:
                raise TinyLLMError(
                    "Q&A data needs a tokenizer: fine-tune from a checkpoint (`init_from=CKPT`, "
                    "its tokenizer is reused) or set `tokenizer.vocab_size` to train one on "
                    f"{str(self.path)!r}."
                )
            # from scratch: the tokenizer learns the template's words too ("Question:" ...)
            tokenizer = train_qa_tokenizer(
                self.records, vocab_size, self.template, pattern=tokenizer_pattern
            )
        self.tokenizer = tokenizer
        self.template.check_tokenizer(tokenizer)
        self.pad_id = self.template.pad_id(tokenizer)
        self.train_records, self.val_records = split_records(
            self.records, val_fraction, val_count, self.seed
        )
        train_ex, train_stats = encode_records(
            self.train_records, tokenizer, self.template, self.block_size
        )
        val_ex, val_stats = encode_records(
            self.val_records, tokenizer, self.template, self.block_size
        )
        if not train_ex:
            raise TinyLLMError(
                f"No training example of {str(self.path)!r} has an answer token within "
                f"block_size={self.block_size} tokens. Fix: raise `model.block_size` or "
                "shorten the questions."
            )
        self._warn_cut({"train": train_stats, "val": val_stats})
        self.stats = {"train": train_stats, "val": val_stats}
        self.train_dataset = QADataset(train_ex, self.block_size, self.pad_id, self.pack)
        self.val_dataset = QADataset(val_ex, self.block_size, self.pad_id, self.pack)
        self.max_token_id = max(max(ids) for ids, _ in train_ex + val_ex)
        self.meta = self._meta(train_ex, val_ex)

    @classmethod
    def from_config(
        cls,
        settings: DataSettings,
        path: str | None = None,
        val_fraction: float = 0.1,
        val_count: int | None = None,
        pack: bool = False,
        num_workers: int = 0,
        template: Mapping[str, Any] | str | None = None,
        name: str = "qa",
        source: str = "qa",
    ) -> QADataModule:
        """The builder of conf/data/qa.yaml (its options are this signature's; `name` and
        `source` only label the data). The tokenizer: the checkpoint's when fine-tuning
        (`init_from`), else `tokenizer.path`, else one trained on the file (`tokenizer.*`)."""
        if path in (None, "", "???"):
            raise TinyLLMError(
                "data=qa needs the Q&A file: add `data.path=FILE` (a JSON array or JSON Lines "
                f"of records like {_EXAMPLE})."
            )
        tok_cfg = settings.tokenizer
        return cls(
            path,
            tokenizer=_given_tokenizer(settings),
            block_size=settings.block_size,
            batch_size=settings.batch_size,
            val_fraction=val_fraction,
            val_count=val_count,
            seed=settings.seed,
            pack=pack,
            template=dict(template) if isinstance(template, Mapping) else template,
            num_workers=num_workers,
            vocab_size=tok_cfg.get("vocab_size"),
            tokenizer_pattern=tok_cfg.get("pattern") or "gpt4",
        )

    def _warn_cut(self, stats: dict[str, dict[str, int]]) -> None:
        for split, st in stats.items():
            if st["truncated"] or st["dropped"]:
                rank_zero_warn(
                    f"Q&A {split} split of {str(self.path)!r}: {st['truncated']} example(s) "
                    f"longer than block_size+1={self.block_size + 1} tokens were cut (their "
                    f"answers lose their end), {st['dropped']} dropped (no answer token left). "
                    "Raise `model.block_size` to keep them whole."
                )

    def _meta(self, train_ex: Any, val_ex: Any) -> dict[str, Any]:
        def split_meta(examples: Any, n_records: int) -> dict[str, int]:
            # tokens/bytes of the *targets* (answers + eos), so bits per byte = answer bpb
            targets = [t for ids, m in examples for t, keep in zip(ids[1:], m[1:]) if keep]
            specials = set(getattr(self.tokenizer, "special_tokens", {}).values())
            plain = [t for t in targets if t not in specials]
            n_bytes = len(self.tokenizer.decode(plain).encode("utf-8")) if plain else 0
            return {"tokens": len(targets), "bytes": n_bytes, "documents": n_records}

        from tinyllm.data.prepare import tokenizer_meta

        return {
            **tokenizer_meta(self.tokenizer),
            "format": "qa",
            "path": str(self.path),
            "source": {"path": str(self.path), "sha256": sha256_file(self.path)},
            "chat_template": self.template.to_dict(),
            "block_size": self.block_size,
            "pack": self.pack,
            "seed": self.seed,
            "splits": {
                "train": split_meta(train_ex, len(self.train_records)),
                "val": split_meta(val_ex, len(self.val_records)),
            },
        }

    @property
    def chat_template(self) -> ChatTemplate:
        """The template the examples were encoded with (store `.to_dict()` in checkpoints)."""
        return self.template

    def callbacks(self) -> list[L.Callback]:
        """Exact match of greedy answers to the held-out questions, at each validation."""
        if not self.val_records:
            return []
        return [ExactMatchCallback(self.val_records, self.tokenizer, self.chat_template)]

    def check_compatible(self, model_config: Mapping[str, Any]) -> None:
        """Raise when the model cannot take these batches (ids >= vocab, windows too long)."""
        vocab_size, block_size = model_config["vocab_size"], model_config["block_size"]
        if self.max_token_id >= vocab_size:
            raise TinyLLMError(
                f"The Q&A data uses token id {self.max_token_id} but the model's vocab_size is "
                f"{vocab_size}. Fix: use the tokenizer of the checkpoint you fine-tune "
                "(`init_from=CKPT`), or set model.vocab_size to the tokenizer's vocab_size."
            )
        if self.block_size > block_size:
            raise TinyLLMError(
                f"Q&A examples are cut to block_size={self.block_size} but the model's "
                f"block_size is {block_size}. Fix: set the data's block_size <= the model's."
            )

    # ------------------------------------------------------------------ loaders
    def _world(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return 1, 0
        return int(trainer.world_size), int(trainer.global_rank)

    def _loader(self, ds: QADataset, sampler: Any) -> DataLoader:
        pin = torch.cuda.is_available() if self.pin_memory is None else self.pin_memory
        return DataLoader(
            ds,
            batch_size=self.batch_size,
            sampler=sampler,
            collate_fn=_Collate(self.pad_id),
            num_workers=self.num_workers,
            pin_memory=pin,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        world, rank = self._world()
        # Rank-aware on its own (works with use_distributed_sampler=False). The order of an
        # epoch is a function of (seed, epoch) alone: Lightning calls set_epoch, so a resumed
        # run replays the same epoch orders (one process is the world_size=1 case).
        sampler = DistributedSampler(
            self.train_dataset, num_replicas=world, rank=rank, shuffle=True, seed=self.seed
        )
        return self._loader(self.train_dataset, sampler)

    def val_dataloader(self) -> DataLoader | list:
        if len(self.val_dataset) == 0:
            return []
        world, rank = self._world()
        # every rank takes every world-th example, none repeated: summed losses stay exact
        sampler = _Shard(len(self.val_dataset), rank, world) if world > 1 else None
        return self._loader(self.val_dataset, sampler)


def _given_tokenizer(settings: DataSettings) -> BPETokenizer | None:
    """The checkpoint's tokenizer (fine-tuning), or tokenizer.path's; None: train one."""
    if settings.init_from:
        from tinyllm.checkpoint import read_checkpoint, tokenizer_from_checkpoint

        ckpt = read_checkpoint(settings.init_from)
        return tokenizer_from_checkpoint(ckpt, settings.init_from)
    if settings.tokenizer.get("path"):
        from tinyllm.data.prepare import open_tokenizer

        return open_tokenizer(str(settings.tokenizer["path"]), settings.tokenizer)
    return None


class _Shard(Sampler[int]):
    """Indices rank, rank + world, ... of n: a disjoint shard per rank, without padding."""

    def __init__(self, n: int, rank: int, world: int) -> None:
        self.indices = list(range(rank, n, world))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


# ---------------------------------------------------------------------------- evaluation


def split_prompt(record: Any) -> tuple[list[Message], str]:
    """(conversation before the last answer, that answer) of a record, for evaluation."""
    messages = as_messages(record)
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return messages[:last], messages[last]["content"]


def greedy_answer(
    model: torch.nn.Module,
    tokenizer: TokenizerLike,
    prompt: str | Sequence[Message],
    template: ChatTemplate | Mapping[str, Any] | None = None,
    max_new_tokens: int = 64,
) -> tuple[str, bool]:
    """The model's greedy answer to a question (or conversation) and whether it stopped at eos."""
    tmpl = ChatTemplate.coerce(template)
    ids = tmpl.encode_prompt(tokenizer, prompt)
    stops = tmpl.stop_ids(tokenizer)
    # the one decoding loop of tinyllm.sampling, at temperature 0
    new = greedy_answer_ids(model, ids, max_new_tokens, eos_id=stops[0] if stops else None)
    stopped = bool(new) and new[-1] in stops
    return tmpl.decode_answer(tokenizer, new), stopped


def exact_match(
    model: torch.nn.Module,
    tokenizer: TokenizerLike,
    records: Sequence[Any],
    template: ChatTemplate | Mapping[str, Any] | None = None,
    max_new_tokens: int | None = None,
) -> float:
    """Fraction of records whose greedy answer equals the reference (stripped) and ends at eos.

    `max_new_tokens=None` gives each record its reference length + 8 tokens: a correct answer
    needs its tokens and the eos, so a longer budget cannot change the verdict much. A record
    whose prompt and reference answer do not fit in the model's block together is a miss
    without generating: training cut its answer (encode_records), and a 100k-character
    answer would otherwise cost one forward per token (102 s of validation were measured).
    """
    if not records:
        return float("nan")
    tmpl = ChatTemplate.coerce(template)
    block = int(model.config.block_size)
    hits = 0
    for rec in records:
        prompt, ref = split_prompt(rec)
        budget = max_new_tokens
        if budget is None:
            need = len(tokenizer.encode(tmpl.answer_lead + ref + tmpl.assistant_suffix))
            if len(tmpl.encode_prompt(tokenizer, prompt)) + need > block:
                continue  # cannot fit, hence cannot match: a miss
            budget = need + 8
        pred, stopped = greedy_answer(model, tokenizer, prompt, tmpl, budget)
        hits += int(stopped and pred.strip() == ref.strip())
    return hits / len(records)


class ExactMatchCallback(L.Callback):
    """Logs `val/exact_match` (greedy answers to held-out questions) after each validation.

    Records are split across DDP ranks and the hit counts summed, so every rank runs its
    share. Skipped under FSDP, with one line saying so (each rank holds only shards of the
    weights, and ranks would run different numbers of forwards). A compiled model decodes
    eagerly (each new length would recompile the training graph). `pl_module.<model_attr>`
    must be the GPT (taking idx, with `config`).
    """

    def __init__(
        self,
        records: Sequence[Any],
        tokenizer: TokenizerLike,
        template: ChatTemplate | Mapping[str, Any] | None = None,
        max_records: int | None = 64,
        max_new_tokens: int | None = None,
        model_attr: str = "model",
    ) -> None:
        self.records = list(records)[:max_records] if max_records else list(records)
        self.tokenizer = tokenizer
        self.template = ChatTemplate.coerce(template)
        self.max_new_tokens = max_new_tokens
        self.model_attr = model_attr
        self.last: float | None = None
        self._said_fsdp = False

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or not self.records:
            return
        from tinyllm.parallel import eager, is_fsdp

        if is_fsdp(trainer):
            if not self._said_fsdp and trainer.is_global_zero:
                print("tinyllm: val/exact_match is skipped under FSDP (sharded weights); "
                      "score a checkpoint with generate instead.", flush=True)  # fmt: skip
            self._said_fsdp = True
            return
        mine = self.records[trainer.global_rank :: trainer.world_size]
        model = getattr(pl_module, self.model_attr)
        with eager(model):
            score = exact_match(model, self.tokenizer, mine, self.template, self.max_new_tokens)
        hits = 0.0 if not mine else score * len(mine)
        t = torch.tensor([hits, float(len(mine))], device=pl_module.device)
        t = trainer.strategy.reduce(t, reduce_op="sum") if trainer.world_size > 1 else t
        self.last = float(t[0] / t[1])
        pl_module.log("val/exact_match", self.last, prog_bar=True, sync_dist=False)
