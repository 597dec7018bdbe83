"""Attention maps: which earlier tokens does each head look at?

    python -m tinyllm.visualize ckpt=PATH prompt="The cat sat on the mat" out=attn.png
        [layers=[0,3]] [heads=[0,1]]

runs the prompt through the model once with `return_attn=True` (the manual attention path,
which materialises softmax(q k^T / sqrt(d))) and draws one heat map per layer (rows) and head
(columns): row i of a map is the distribution over keys that query token i attends to. Look
for previous-token heads (a bright sub-diagonal), heads that park on the first token (an
"attention sink"), and induction heads on repeated text.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from tinyllm.errors import TinyLLMError, exit_on_user_error
from tinyllm.io import atomic_write, unwrap_compiled
from tinyllm.model import GPT


@torch.no_grad()
def attention_maps(model: GPT, ids: Sequence[int]) -> list[torch.Tensor]:
    """Attention weights per layer, each (n_head, T, T), for one sequence of token ids."""
    model = unwrap_compiled(model)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    idx = torch.tensor([list(ids)], dtype=torch.long, device=device)  # (1, T)
    _, attns = model(idx, return_attn=True)
    model.train(was_training)
    return [a[0].float().cpu() for a in attns]  # n_layer x (H, T, T)


def _label(tokenizer: Any, i: int) -> str:
    """A short printable label for token i (whitespace made visible)."""
    if tokenizer is None:
        return str(i)
    s = tokenizer.token_bytes(i).decode("utf-8", errors="replace")
    return s.replace(" ", "\u2423").replace("\n", "\\n").replace("\t", "\\t")[:12]


def render_attention(
    attns: Sequence[torch.Tensor],
    labels: Sequence[str],
    out: str | os.PathLike,
    layers: Sequence[int] | None = None,
    heads: Sequence[int] | None = None,
    title: str | None = None,
) -> Path:
    """Draw a grid of heat maps (rows = layers, columns = heads) to a PNG at `out`."""
    fig = attention_figure(attns, labels, layers, heads, title)
    return atomic_write(out, lambda p: fig.savefig(p, format="png"))


def attention_figure(
    attns: Sequence[torch.Tensor],
    labels: Sequence[str],
    layers: Sequence[int] | None = None,
    heads: Sequence[int] | None = None,
    title: str | None = None,
) -> Any:
    """The matplotlib Figure of `render_attention`: heat maps, token labels, a colour bar."""
    # Figure + Agg canvas directly (no pyplot): no global state, no display needed.
    from matplotlib.figure import Figure

    n_layer, n_head = len(attns), attns[0].size(0)
    layers = list(range(n_layer)) if layers is None else list(layers)
    heads = list(range(n_head)) if heads is None else list(heads)
    for name, chosen, n in (("layers", layers, n_layer), ("heads", heads, n_head)):
        wrong = [i for i in chosen if not 0 <= i < n]
        if wrong or not chosen:
            raise TinyLLMError(
                f"visualize: {name}={chosen} is invalid; this model has {n} {name} "
                f"(valid indices 0..{n - 1}). Pass e.g. `{name}=[0,1]`, or leave it null for all."
            )
    T = attns[0].size(-1)
    # Inches per map: a token's row must fit a legible label (at most 5 in a map, so a 4x4
    # grid stays on a screen); the label size then follows the row height.
    cell = min(max(0.22 * T, 2.5), 5.0)
    fontsize = min(max(cell * 72 / T * 0.85, 5.0), 10.0)  # points: 72 per inch
    fig = Figure(
        figsize=(cell * len(heads) + 1.5, cell * len(layers) + 1.0), dpi=100, layout="constrained"
    )
    axes = fig.subplots(len(layers), len(heads), squeeze=False, sharex=True, sharey=True)
    every = max(1, math.ceil(T / 48))  # long prompts: label every k-th token
    ticks = list(range(0, T, every))
    image = None
    for r, layer in enumerate(layers):
        for c, head in enumerate(heads):
            ax = axes[r][c]
            image = ax.imshow(attns[layer][head].numpy(), cmap="viridis", vmin=0.0, vmax=1.0)
            ax.set_title(f"layer {layer} head {head}", fontsize=10)
            # labels on the outer maps only (shared axes): the inner ones stay uncluttered
            ax.set_xticks(ticks, [labels[i] for i in ticks], rotation=90, fontsize=fontsize)
            ax.set_yticks(ticks, [labels[i] for i in ticks], fontsize=fontsize)
            ax.tick_params(labelbottom=r == len(layers) - 1, labelleft=c == 0)
    fig.colorbar(image, ax=axes, shrink=0.6, label="attention weight (each row sums to 1)")
    if title:
        fig.suptitle(title, fontsize=12)
    fig.supxlabel("key (attended to)", fontsize=11)
    fig.supylabel("query (attending)", fontsize=11)
    return fig


def visualize(
    model: GPT,
    tokenizer: Any,
    prompt: str,
    out: str | os.PathLike,
    layers: Sequence[int] | None = None,
    heads: Sequence[int] | None = None,
) -> Path:
    """Encode `prompt`, compute its attention maps and render them to the PNG `out`."""
    ids = tokenizer.encode(prompt) if prompt else []
    if not ids:
        raise TinyLLMError('visualize: the prompt is empty. Pass some text: prompt="...".')
    block = model.config.block_size
    if len(ids) > block:
        print(f"visualize: prompt is {len(ids)} tokens; showing its last {block} (block_size)")
        ids = ids[-block:]
    attns = attention_maps(model, ids)
    title = f"{prompt[:60]!r} ({len(ids)} tokens)"
    labels = [_label(tokenizer, i) for i in ids]
    return render_attention(attns, labels, out, layers=layers, heads=heads, title=title)


def run(
    ckpt: str,
    prompt: str,
    out: str = "attn.png",
    layers: Sequence[int] | None = None,
    heads: Sequence[int] | None = None,
    device: str = "cpu",
) -> Path:
    from tinyllm import load_checkpoint
    from tinyllm.checkpoint import resolve_ckpt

    if not ckpt:
        raise TinyLLMError(
            "visualize needs `ckpt=PATH` (a .ckpt, a run directory or `latest`), e.g. "
            '`python -m tinyllm.visualize ckpt=latest prompt="Hello" out=attn.png`.'
        )
    model, tokenizer = load_checkpoint(str(resolve_ckpt(ckpt)), device=device)
    path = visualize(model, tokenizer, prompt, out, layers=layers, heads=heads)
    print(f"wrote {path}")
    return path


def _hydra_main() -> None:

    import hydra
    from omegaconf import DictConfig, OmegaConf

    @hydra.main(config_path="../conf", config_name="visualize", version_base="1.3")
    def main(cfg: DictConfig) -> None:
        def ints(v: Any) -> list[int] | None:
            if v is None:
                return None
            v = OmegaConf.to_object(v) if OmegaConf.is_config(v) else v
            return [int(i) for i in (v if isinstance(v, list) else [v])]

        with exit_on_user_error():
            run(cfg.ckpt, str(cfg.prompt), cfg.out, ints(cfg.layers), ints(cfg.heads), cfg.device)

    main()


if __name__ == "__main__":
    from tinyllm.cli import hydra_entry

    hydra_entry(_hydra_main, "visualize")
