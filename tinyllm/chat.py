"""The chat template: how a question/answer pair (or a conversation) becomes token ids.

The default renders one pair as

    <bos>Question: {question}\\nAnswer: {answer}<eos>

where `<bos>` and `<eos>` are the tokenizer's special ids, never text (a user typing "<|eos|>"
in a question cannot end the answer). A conversation is the concatenation of its turns, with
one `<bos>` at the start and an `<eos>` after every answer, so the model learns to stop.

Two details matter for fine-tuning to work:

- The loss mask is True exactly on the answer tokens and the `<eos>` after each answer:
  the model is taught to answer, not to write questions.
- The text is encoded in runs (everything up to "Answer:" is one run, the answer another), and
  `encode_prompt` encodes the prompt exactly as `encode_example` encoded the same prefix. The
  space after "Answer:" (`answer_lead`) belongs to the answer run: BPE keeps " I" as one token
  as in ordinary text, and generation starts at the same token boundary as training did.

The template is a dataclass of plain strings, so it lives in a checkpoint as a dict
(`to_dict`/`from_dict`) and in a YAML (`data.template.user_prefix=...`). It sits at the top of
the package, importing nothing of it but errors, so data (training examples) and sampling
(prompts) share it without sampling depending on data.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from tinyllm.errors import TinyLLMError

ROLES = ("system", "user", "assistant")

# The target id of a token the loss skips (what the mask marks untrained: prompts, padding).
# It is F.cross_entropy's default ignore_index; the loss (module.py) and the Q&A batches
# (data/qa.py) both take it from here, so they cannot disagree.
IGNORE_INDEX = -100

Message = dict[str, str]  # {"role": "user"|"assistant"|"system", "content": str}


class TokenizerLike(Protocol):
    """The part of BPETokenizer the template uses."""

    bos_id: int | None
    eos_id: int | None
    pad_id: int | None

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


@dataclass
class ChatTemplate:
    """Prefix/suffix strings per role; `<bos>`/`<eos>` are added as special ids."""

    system_prefix: str = "System: "
    system_suffix: str = "\n"
    user_prefix: str = "Question: "
    user_suffix: str = "\n"
    assistant_prefix: str = "Answer:"  # the prompt ends here; generation continues the answer
    answer_lead: str = " "  # first characters of every answer (trained, stripped when decoding)
    assistant_suffix: str = ""  # after the answer text, before <eos> (trained)
    add_bos: bool = True  # one <bos> at the start of every conversation
    add_eos: bool = True  # <eos> after every answer (trained, so the model learns to stop)

    # ---------------------------------------------------------------- (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ChatTemplate:
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(d) - set(names))
        if unknown:
            raise TinyLLMError(
                f"Unknown chat template option(s) {unknown}. Valid options are: {names}. "
                "Fix `data.template` in conf/data/qa.yaml (or the `data.template.<name>=` "
                "override)."
            )
        for k, v in d.items():
            want = bool if k in ("add_bos", "add_eos") else str
            if not isinstance(v, want):
                raise TinyLLMError(
                    f"Chat template option {k!r} must be a {want.__name__}, got "
                    f"{type(v).__name__} ({v!r}). Fix `data.template.{k}`; quote strings "
                    "in YAML (e.g. `user_prefix: 'Q: '`)."
                )
        return cls(**dict(d))

    @classmethod
    def coerce(cls, obj: ChatTemplate | Mapping[str, Any] | str | None) -> ChatTemplate:
        """Accept a template, a dict (from YAML or a checkpoint), its JSON string, or None."""
        if obj is None:
            return cls()
        if isinstance(obj, ChatTemplate):
            return obj
        if isinstance(obj, str):
            try:
                obj = json.loads(obj)
            except json.JSONDecodeError as e:
                raise TinyLLMError(
                    f"The chat template {obj[:60]!r} is not valid JSON ({e}). A template is a "
                    "dict of prefix strings, e.g. the `chat_template` a fine-tuned checkpoint "
                    "stores; pass None for the default."
                ) from None
        if not isinstance(obj, Mapping):
            raise TinyLLMError(
                f"A chat template must be a dict of options, got {type(obj).__name__}."
            )
        return cls.from_dict(dict(obj))

    # ---------------------------------------------------------------- checks
    def check_tokenizer(self, tokenizer: TokenizerLike) -> None:
        """Raise a clear error when the tokenizer lacks the special tokens the template needs."""
        missing = []
        if self.add_bos and getattr(tokenizer, "bos_id", None) is None:
            missing.append("bos")
        if self.add_eos and getattr(tokenizer, "eos_id", None) is None:
            missing.append("eos")
        if missing:
            raise TinyLLMError(
                f"The tokenizer has no {'/'.join(missing)} special token, which the Q&A chat "
                "template needs (an answer ends with <eos> so the model learns to stop). Fix: "
                "fine-tune from a checkpoint (`init_from=CKPT`) whose tokenizer was trained "
                "with the default specials <|bos|>, <|eos|>, <|pad|>, or train the tokenizer "
                "again with them (BPETokenizer.train(..., special_tokens=None) adds them)."
            )

    @staticmethod
    def pad_id(tokenizer: TokenizerLike) -> int:
        """The id used to pad batches: `<pad>`, else `<eos>` (padded targets are ignored)."""
        pad = getattr(tokenizer, "pad_id", None)
        if pad is None:
            pad = getattr(tokenizer, "eos_id", None)
        if pad is None:
            raise TinyLLMError(
                "The tokenizer has neither a pad nor an eos special token to pad Q&A batches "
                "with. Fix: use a tokenizer trained with the default specials."
            )
        return int(pad)

    # ---------------------------------------------------------------- rendering
    def _segments(self, messages: Sequence[Message], prompt: bool) -> list[tuple[Any, bool]]:
        """The conversation as [(text | special-name, trained)] pieces, in order.

        `prompt=True` appends the assistant prefix so the model continues with the answer.
        """
        segs: list[tuple[Any, bool]] = []
        if self.add_bos:
            segs.append((("special", "bos"), False))
        for m in messages:
            role, content = m["role"], m["content"]
            if role == "system":
                segs.append((self.system_prefix + content + self.system_suffix, False))
            elif role == "user":
                segs.append((self.user_prefix + content + self.user_suffix, False))
            elif role == "assistant":
                segs.append((self.assistant_prefix, False))
                segs.append((self.answer_lead + content + self.assistant_suffix, True))
                if self.add_eos:
                    segs.append((("special", "eos"), True))
            else:  # validated when loading; this guards direct API use
                raise TinyLLMError(f"Unknown chat role {role!r}; valid roles are {ROLES}.")
        if prompt:
            segs.append((self.assistant_prefix, False))
        return segs

    def _encode(
        self, tokenizer: TokenizerLike, messages: Sequence[Message], prompt: bool
    ) -> tuple[list[int], list[bool]]:
        self.check_tokenizer(tokenizer)
        # merge neighbouring text pieces with the same mask flag into one run, so the prompt
        # tokenises like ordinary text and the same way in training and in generation
        runs: list[tuple[Any, bool]] = []
        for piece, trained in self._segments(messages, prompt):
            prev = runs[-1] if runs else None
            if prev and isinstance(piece, str) and isinstance(prev[0], str) and prev[1] == trained:
                runs[-1] = (prev[0] + piece, trained)
                continue
            runs.append((piece, trained))
        ids: list[int] = []
        mask: list[bool] = []
        for piece, trained in runs:
            if isinstance(piece, str):
                new = tokenizer.encode(piece) if piece else []
            else:
                new = [int(tokenizer.bos_id if piece[1] == "bos" else tokenizer.eos_id)]
            ids.extend(new)
            mask.extend([trained] * len(new))
        return ids, mask

    def encode_example(self, tokenizer: TokenizerLike, record: Any) -> tuple[list[int], list[bool]]:
        """Token ids of a training record and its loss mask (True on answers and their eos).

        `record` is a {"question", "answer"} dict, a {"messages": [...]} dict, or a message list.
        """
        return self._encode(tokenizer, as_messages(record), prompt=False)

    def encode_prompt(self, tokenizer: TokenizerLike, question_or_messages: Any) -> list[int]:
        """Ids of the prompt for a question (or a conversation so far), ending after "Answer:".

        A message list may hold earlier turns (a chat history); a trailing assistant message
        is not allowed, since the model is about to write it.
        """
        if isinstance(question_or_messages, str):
            messages: list[Message] = [{"role": "user", "content": question_or_messages}]
        else:
            messages = _check_messages(list(question_or_messages), "the prompt")
            if messages and messages[-1]["role"] == "assistant":
                raise TinyLLMError(
                    "The prompt conversation ends with an assistant message; the last message "
                    "must be the user's question the model should answer."
                )
        ids, _ = self._encode(tokenizer, messages, prompt=True)
        return ids

    def render_text(self, record: Any) -> str:
        """The conversation as plain text without special tokens (e.g. to train a tokenizer)."""
        parts = [p for p, _ in self._segments(as_messages(record), prompt=False)]
        return "".join(p for p in parts if isinstance(p, str))

    def stop_ids(self, tokenizer: TokenizerLike) -> list[int]:
        """Token ids that end an answer (generation stops on any of them)."""
        return [int(tokenizer.eos_id)] if getattr(tokenizer, "eos_id", None) is not None else []

    def decode_answer(self, tokenizer: TokenizerLike, ids: Sequence[int]) -> str:
        """Text of generated answer ids: cut at the first stop id, strip lead and suffix."""
        ids = list(ids)
        stops = set(self.stop_ids(tokenizer))
        for i, t in enumerate(ids):
            if t in stops:
                ids = ids[:i]
                break
        text = tokenizer.decode(ids)
        if self.answer_lead and text.startswith(self.answer_lead):
            text = text[len(self.answer_lead) :]
        if self.assistant_suffix and text.endswith(self.assistant_suffix):
            text = text[: -len(self.assistant_suffix)]
        return text


# ---------------------------------------------------------------------------- records


def as_messages(record: Any) -> list[Message]:
    """Normalise a record to a message list (a {"question","answer"} pair becomes two turns)."""
    if isinstance(record, Mapping):
        if "messages" in record:
            return _check_messages(record["messages"], "the record")
        if "question" in record and "answer" in record:
            return [
                {"role": "user", "content": record["question"]},
                {"role": "assistant", "content": record["answer"]},
            ]
        raise TinyLLMError(
            f"A Q&A record needs `question` and `answer` (or `messages`); got keys "
            f"{sorted(record)}."
        )
    if isinstance(record, Sequence) and not isinstance(record, str):
        return _check_messages(record, "the record")
    raise TinyLLMError(f"A Q&A record must be a dict or a message list, got {type(record)}.")


def _check_messages(messages: Any, where: str) -> list[Message]:
    if not isinstance(messages, list | tuple):
        raise TinyLLMError(f"`messages` of {where} must be a list of {{role, content}} dicts.")
    out = []
    for i, m in enumerate(messages, 1):
        if not isinstance(m, Mapping) or m.get("role") not in ROLES:
            raise TinyLLMError(
                f"Message {i} of {where} must be a dict with role one of {list(ROLES)}; got {m!r}."
            )
        if not isinstance(m.get("content"), str):
            raise TinyLLMError(f"Message {i} of {where} needs a string `content`; got {m!r}.")
        out.append({"role": m["role"], "content": m["content"]})
    return out
