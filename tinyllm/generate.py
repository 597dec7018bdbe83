"""`python -m tinyllm.generate ckpt=PATH prompt="ROMEO:"`: sample text from a checkpoint.

The checkpoint alone rebuilds model and tokenizer (no conf/ tree, no data folder). The text
goes to stdout as it is generated (token by token in a terminal); a one-line summary
(tokens, tokens/s) goes to stderr, so `... > out.txt` captures only the text.

    python -m tinyllm.generate ckpt=latest prompt="def " max_new_tokens=200 temperature=0.8
    python -m tinyllm.generate ckpt=PATH interactive=true       # a chat REPL

The Python API lives in tinyllm.sampling and is re-exported here:
`generate(model, tokenizer, prompt, ...) -> str | list[str]` and
`generate_stream(...) -> Iterator[str]`.
"""

from __future__ import annotations

import re
import sys
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import hydra
import torch
from omegaconf import DictConfig, ListConfig

from tinyllm.chat import ChatTemplate
from tinyllm.errors import TinyLLMError, exit_on_user_error
from tinyllm.sampling import SamplingConfig, generate, generate_stream

__all__ = ["generate", "generate_stream", "load_for_generation", "main"]

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# ---------------------------------------------------------------------------- loading


def resolve_device(device: str) -> torch.device:
    device = str(device)
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise TinyLLMError(
            f"device={device!r} is not a device name. Use auto, cpu, cuda, cuda:N or mps."
        ) from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise TinyLLMError(
            f"device={device} was asked for but this machine has no CUDA GPU visible to torch. "
            "Use device=cpu (or device=auto)."
        )
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise TinyLLMError("device=mps was asked for but MPS is not available. Use device=cpu.")
    return dev


def load_for_generation(
    ckpt: str | Path, device: str | torch.device = "cpu", dtype: str = "fp32"
) -> tuple[torch.nn.Module, Any, dict[str, Any] | None]:
    """(model in eval mode on device/dtype, tokenizer, chat template dict or None)."""
    from tinyllm.checkpoint import (
        model_from_checkpoint,
        read_checkpoint,
        resolve_ckpt,
        tokenizer_from_checkpoint,
    )

    if ckpt is None or str(ckpt) == "":
        raise TinyLLMError(
            "No checkpoint given. Pass `ckpt=PATH` (a .ckpt file or a run directory), or "
            "`ckpt=latest` for the newest outputs/**/checkpoints/last.ckpt."
        )
    if dtype not in DTYPES:
        raise TinyLLMError(f"dtype={dtype!r} is not supported. Use one of {sorted(DTYPES)}.")
    path = resolve_ckpt(str(ckpt))
    ckpt_dict = read_checkpoint(path)
    try:
        model = model_from_checkpoint(ckpt_dict, path)
        tokenizer = tokenizer_from_checkpoint(ckpt_dict, path)
    except TinyLLMError:
        raise
    except Exception as e:  # e.g. a config key this version does not know
        raise TinyLLMError(
            f"Checkpoint '{path}' is incompatible with this tinyllm version "
            f"({type(e).__name__}: {e}). Use a checkpoint written by this version of "
            "`python -m tinyllm.train`, or the tinyllm version that wrote it."
        ) from None
    if tokenizer.vocab_size > model.config.vocab_size:
        raise TinyLLMError(
            f"Checkpoint '{path}' has a tokenizer of {tokenizer.vocab_size} tokens but a model "
            f"with vocab_size={model.config.vocab_size}; it was assembled from mismatching "
            "parts. Re-save it with the tokenizer it was trained with."
        )
    model.to(device=resolve_device(str(device)) if isinstance(device, str) else device)
    model.to(dtype=DTYPES[dtype]).eval()
    chat = ckpt_dict["hyper_parameters"].get("chat_template")
    return model, tokenizer, chat


# ---------------------------------------------------------------------------- config


def _opt(cfg: DictConfig, key: str, kind: type, allow_none: bool = True) -> Any:
    """cfg[key] as `kind`, or a TinyLLMError naming the option."""
    value = cfg.get(key)
    if value is None:
        if allow_none:
            return None
        raise TinyLLMError(f"`{key}` must be set (got null).")
    try:
        if kind is bool:
            if isinstance(value, bool):
                return value
            raise ValueError
        if kind is int and (isinstance(value, bool) or float(value) != int(float(value))):
            raise ValueError
        return kind(value)
    except (TypeError, ValueError):
        raise TinyLLMError(
            f"`{key}={value}` is not a valid {kind.__name__}. Fix the `{key}=` override."
        ) from None


def _sampling(cfg: DictConfig) -> SamplingConfig:
    """The decode settings from the command line, type-checked, then range-checked."""
    return SamplingConfig(
        temperature=_opt(cfg, "temperature", float, allow_none=False),
        top_k=_opt(cfg, "top_k", int),
        top_p=_opt(cfg, "top_p", float),
        min_p=_opt(cfg, "min_p", float),
        repetition_penalty=_opt(cfg, "repetition_penalty", float, allow_none=False),
        max_new_tokens=_opt(cfg, "max_new_tokens", int, allow_none=False),
        use_cache=bool(cfg.get("use_cache", True)),
    ).validate()


# Hydra keeps a backslash in a command-line string as it is: stop='["\n\n"]' arrives as
# backslash-n. Read the common escapes, so the documented form means a blank line (a real
# newline from a YAML file is left alone; write \\n for a literal backslash-n).
_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\"}


def unescape(text: str) -> str:
    r"""`\n`, `\t`, `\r` and `\\` in a command-line string -> newline, tab, CR, backslash."""
    return re.sub(r"\\([ntr\\])", lambda m: _ESCAPES[m.group(1)], text)


def _stops(cfg: DictConfig) -> list[str]:
    stop = cfg.get("stop")
    if stop is None:
        return []
    if isinstance(stop, str):
        return [unescape(stop)]
    if isinstance(stop, ListConfig | list | tuple):
        return [unescape(str(s)) for s in stop]
    raise TinyLLMError(f"`stop={stop}` must be a string or a list of strings, e.g. stop='[END]'.")


def _prompt(cfg: DictConfig) -> str:
    if cfg.get("prompt_file"):
        path = Path(str(cfg.prompt_file))
        try:
            return path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise TinyLLMError(
                f"Could not read prompt_file '{path}' ({type(e).__name__}: {e}). Pass an "
                "existing UTF-8 text file, or use `prompt=` instead."
            ) from None
    prompt = cfg.get("prompt")
    return "" if prompt is None else str(prompt)


def _chat_template(cfg: DictConfig, ckpt_chat: Any) -> Any:
    chat = cfg.get("chat", "auto")
    if chat == "auto" or chat is None:
        return ckpt_chat
    if chat is True:
        return ckpt_chat if ckpt_chat is not None else {}  # {} -> the default template
    if chat is False:
        return None
    raise TinyLLMError(f"`chat={chat}` must be auto, true or false.")


# ---------------------------------------------------------------------------- running


def _chat_prefix(template: Any, question: str) -> str:
    """How a templated prompt reads as text (without the special tokens)."""
    t = ChatTemplate.coerce(template)
    return t.user_prefix + question + t.user_suffix + t.assistant_prefix + t.answer_lead


def _summary(stats: dict[str, Any], seconds: float, device: torch.device, dtype: str) -> str:
    n = int(stats.get("new_tokens", 0))
    rate = n / seconds if seconds > 0 else float("inf")
    return (
        f"[generated {n} tokens in {seconds:.2f} s: {rate:.1f} tokens/s | prompt "
        f"{stats.get('prompt_tokens', 0)} tokens | {device.type} {dtype}]"
    )


def run(cfg: DictConfig) -> None:
    device = resolve_device(str(cfg.get("device", "auto")))
    sampling = _sampling(cfg)
    num_samples = _opt(cfg, "num_samples", int, allow_none=False)
    seed = _opt(cfg, "seed", int)
    if num_samples < 1:
        raise TinyLLMError(f"num_samples={num_samples}: use a whole number >= 1.")
    stop = _stops(cfg)
    prompt = _prompt(cfg)
    dtype = str(cfg.get("dtype", "fp32"))
    ckpt = cfg.get("ckpt")
    if str(ckpt) == "latest":  # say which: after a sweep the newest is the last job's
        from tinyllm.checkpoint import resolve_ckpt

        ckpt = resolve_ckpt("latest")
        print(f"[ckpt=latest: {ckpt}]", file=sys.stderr, flush=True)
    model, tokenizer, ckpt_chat = load_for_generation(ckpt, device, dtype)
    template = _chat_template(cfg, ckpt_chat)
    opts = dict(stop=stop, chat_template=template, sampling=sampling)
    if _opt(cfg, "interactive", bool):
        return _repl(model, tokenizer, template, seed, device, dtype, opts)

    out = sys.stdout
    tty = out.isatty()
    shown = _chat_prefix(template, prompt) if template is not None else prompt
    stats: dict[str, Any] = {}
    t0 = time.perf_counter()
    with warnings_after_text(out):
        if num_samples == 1:
            out.write(shown)
            out.flush()
            for piece in generate_stream(model, tokenizer, prompt, seed=seed, stats=stats, **opts):
                out.write(piece)
                if tty:
                    out.flush()  # token by token in a terminal; a pipe gets the usual buffering
            out.write("\n")
        else:
            texts = generate(
                model, tokenizer, prompt, num_samples=num_samples, seed=seed, stats=stats, **opts
            )
            for i, text in enumerate(texts):
                if i:
                    out.write("---------------\n")
                out.write(shown + text + "\n")
    seconds = time.perf_counter() - t0
    print(_summary(stats, seconds, device, dtype), file=sys.stderr, flush=True)


def _repl(
    model: torch.nn.Module,
    tokenizer: Any,
    template: Any,
    seed: int | None,
    device: torch.device,
    dtype: str,
    opts: dict[str, Any],
) -> None:
    """Type a line, watch the answer stream. With a chat template the conversation is kept
    (oldest turns dropped to fit the context); without one each line is a fresh prompt."""
    from tinyllm.chat import ChatTemplate

    generator = torch.Generator(device=device)
    if seed is not None:
        generator.manual_seed(seed)
    else:
        generator.seed()
    mode = "chat (the checkpoint's template)" if template is not None else "text continuation"
    print(
        f"tinyllm interactive: {mode}. Enter a line; Ctrl-C stops an answer, Ctrl-D (or "
        "/quit) leaves, /reset forgets the conversation.",
        file=sys.stderr,
        flush=True,
    )
    history: list[dict[str, str]] = []
    said: set[str] = set()  # warnings already shown this session (each is said once)
    tmpl = ChatTemplate.coerce(template) if template is not None else None
    budget = model.config.block_size * 3 // 4  # leave room for the answer in the window
    while (line := _read_line()) is not None:
        if line.strip() == "/reset":
            history.clear()
            continue
        if not line.strip():
            continue
        prompt: Any = line
        if tmpl is not None:
            history.append({"role": "user", "content": line})
            while len(history) > 1 and len(tmpl.encode_prompt(tokenizer, history)) > budget:
                history = history[2:]  # drop the oldest question and its answer
            prompt = list(history)
        stats: dict[str, Any] = {}
        t0 = time.perf_counter()
        answer = _stream_answer(model, tokenizer, prompt, generator, stats, said, opts)
        if tmpl is not None:
            history.append({"role": "assistant", "content": answer})
        print(_summary(stats, time.perf_counter() - t0, device, dtype), file=sys.stderr, flush=True)


def _read_line() -> str | None:
    """The next line typed, or None to leave (Ctrl-D, /quit); Ctrl-C at the prompt is ignored."""
    while True:
        try:
            line = input("> ")
        except EOFError:
            print(file=sys.stderr)
            return None
        except KeyboardInterrupt:
            print(file=sys.stderr)
            continue
        return None if line.strip() in ("/quit", "/exit") else line


def _stream_answer(
    model: torch.nn.Module,
    tokenizer: Any,
    prompt: Any,
    generator: torch.Generator,
    stats: dict[str, Any],
    said: set[str],
    opts: dict[str, Any],
) -> str:
    """Write the answer to stdout as it is generated; Ctrl-C stops it. Returns the text."""
    answer: list[str] = []
    with warnings_after_text(sys.stdout, said):
        try:
            for piece in generate_stream(
                model, tokenizer, prompt, generator=generator, stats=stats, **opts
            ):
                answer.append(piece)
                sys.stdout.write(piece)
                sys.stdout.flush()
        except KeyboardInterrupt:
            sys.stdout.write(" [stopped]")
        sys.stdout.write("\n")
    return "".join(answer)


@contextmanager
def warnings_after_text(out: IO[str], said: set[str] | None = None) -> Iterator[None]:
    """Hold the warnings raised while text is written to `out` and say each once after it.

    A warning printed mid-stream (e.g. "continuing with a sliding window" when a 200-token
    sample outgrows a 64-token context) lands inside the generated text in a terminal; the
    sliding itself is expected there, so the note waits for the end of the text.
    """
    said = set() if said is None else said
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            yield
        finally:
            out.flush()
    for w in caught:
        message = str(w.message)
        if message not in said:
            said.add(message)
            print(f"warning: {message}", file=sys.stderr, flush=True)


def _format_warning(message, category, filename, lineno, line=None) -> str:  # noqa: ANN001
    return f"warning: {message}\n"


@hydra.main(config_path="../conf", config_name="generate", version_base="1.3")
def main(cfg: DictConfig) -> None:
    warnings.formatwarning = _format_warning  # one readable line, not a source excerpt
    try:
        with exit_on_user_error():
            run(cfg)
    except KeyboardInterrupt:  # Ctrl-C: stop quietly, as `head` or `cat` would
        print(file=sys.stderr)
        sys.exit(130)
    except BrokenPipeError:  # `... | head` closed the pipe: not an error
        sys.stderr.close()
        sys.exit(0)


if __name__ == "__main__":
    from tinyllm.cli import hydra_entry

    hydra_entry(main, "generate")
