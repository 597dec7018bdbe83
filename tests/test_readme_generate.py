"""The README's `python -m tinyllm.generate` examples, run as written (parsed out of README.md).

Each command goes through the shell's quoting (shlex) and Hydra's override parser exactly as
typed; only placeholder checkpoint paths are replaced by a tiny real checkpoint, and
`ckpt=latest` finds it under outputs/ as it would after `make train`.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from tinyllm.checkpoint import save_checkpoint
from tinyllm.model import GPT, ModelConfig
from tinyllm.tokenizer import BPETokenizer

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()


def readme_generate_commands() -> list[str]:
    """Every `python -m tinyllm.generate ...` command: code blocks (with `\\` continuations
    joined) and inline code spans."""
    text = README.replace("\\\n", " ")
    cmds = re.findall(r"^\s*(python -m tinyllm\.generate[^\n#]*)", text, flags=re.M)
    cmds += re.findall(r"`(python -m tinyllm\.generate[^`]*)`", README)
    return sorted({c.strip() for c in cmds})


def generate_section_options() -> list[str]:
    """The inline `key=value` examples of the README's "Generating text" section."""
    section = README.split("## Generating text", 1)[1].split("\n## ", 1)[0]
    keys = set(_compose([]).keys())
    spans = re.findall(r"`([a-z_]+=[^`]*)`", section)
    return [s for s in spans if s.split("=", 1)[0] in keys and "|" not in s]


def _compose(overrides: list[str]):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(config_name="generate", overrides=overrides)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tok = BPETokenizer.train("def f(x):\n    return x\n\nROMEO: Who are you?\n" * 30, 280)
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tok.vocab_size, block_size=64, n_layer=1, n_head=2, n_embd=16)
    path = tmp_path_factory.mktemp("ckpt") / "outputs" / "d" / "t" / "checkpoints" / "last.ckpt"
    path.parent.mkdir(parents=True)
    save_checkpoint(path, GPT(cfg).eval(), tok)
    return path


def test_the_readme_has_generate_examples() -> None:
    cmds = readme_generate_commands()
    assert len(cmds) >= 5 and any("stop=" in c for c in cmds)


@pytest.mark.parametrize("command", readme_generate_commands())
def test_readme_generate_command_runs_as_written(
    command: str, ckpt: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    import tinyllm.generate as gen

    args = shlex.split(command)[3:]  # what the shell hands to `python -m tinyllm.generate`
    # placeholders (path/to/last.ckpt, FT_CKPT) -> the real checkpoint; `latest` stays
    args = [f"ckpt={ckpt}" if a.startswith("ckpt=") and a != "ckpt=latest" else a for a in args]
    monkeypatch.chdir(ckpt.parents[4])  # the folder holding outputs/
    questions = ["Who are you?"]

    def ask(prompt: str = "") -> str:
        if not questions:
            raise EOFError  # Ctrl-D
        return questions.pop()

    monkeypatch.setattr("builtins.input", ask)

    seen: list[dict] = []
    real = gen.generate_stream

    def spy(*a, **kw):
        seen.append(kw)
        return real(*a, **kw)

    monkeypatch.setattr(gen, "generate_stream", spy)
    monkeypatch.setattr(gen, "generate", lambda *a, **kw: seen.append(kw) or ["x"] * 2)
    cfg = _compose(args)
    gen.run(cfg)
    out, err = capsys.readouterr()
    assert seen, (command, out, err)
    if "ckpt=latest" in args:
        assert f"[ckpt=latest: {Path('outputs/d/t/checkpoints/last.ckpt')}]" in err
    if "stop=" in command:  # the documented '["\n\n"]' means a blank line, not backslash-n
        assert seen[0]["stop"] == ["\n\n"]


@pytest.mark.parametrize("option", generate_section_options())
def test_readme_generate_options_parse_as_documented(option: str) -> None:
    (arg,) = shlex.split(option)
    cfg = _compose([arg])
    key = arg.split("=", 1)[0]
    expected = {
        "stop": ["\n\n"],
        "prompt": {"prompt='def '": "def ", "prompt='Hello, world'": "Hello, world"}.get(arg),
    }
    if key == "stop":
        from tinyllm.generate import _stops

        assert _stops(cfg) == expected["stop"]
    elif key == "prompt" and expected["prompt"] is not None:
        assert cfg.prompt == expected["prompt"]
