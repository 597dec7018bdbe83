"""Optimizers, chosen by name from conf/optim/ (`optim=adamw`, the default, or `optim=muon`).

AdamW updates every parameter with per-coordinate adaptive steps. Muon (Jordan et al., 2024)
updates a weight *matrix* with its momentum orthogonalised by a few Newton-Schulz iterations:
every direction of the matrix moves by about the same amount, so rare directions are not
starved. That only makes sense for the hidden matrices (attention and MLP projections):
embeddings and the LM head are lookup tables over tokens, and norms, biases and scalars are
not matrices at all, so those stay with AdamW. We use torch's own `torch.optim.Muon` and keep
our code to the split, the config and one optimizer object that Lightning can drive.

Which parameter goes where is decided by NAME and SHAPE on the plain model, before any
wrapper touches it: FSDP (use_orig_params) hands the optimizer flat 1-D shards, on which a
`p.dim() >= 2` test would put every matrix in the no-decay group.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, MutableMapping
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import nn

from tinyllm.errors import TinyLLMError

# Names a wrapper inserts into parameter names (FSDP, activation checkpointing, compile).
_WRAPPER_PARTS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")
_EMBEDDINGS = ("transformer.wte.weight", "pos.wpe.weight")


@dataclass
class OptimConfig:
    """Every optimizer and schedule setting (conf/train.yaml `optim:` + conf/optim/<name>.yaml).

    `lr`, `weight_decay` and `min_lr` belong to the optimizer named: AdamW's under adamw,
    Muon's (the hidden matrices) under muon, whose AdamW side has `adam_lr` and
    `adam_weight_decay` (null -> the same as lr / weight_decay) and shares beta1/beta2/eps.
    The schedule multiplies every group's LR by the same factor, so min_lr / lr is the floor
    of both sides.
    """

    name: str = "adamw"
    lr: float = 1e-3
    min_lr: float | None = None  # None -> lr / 10
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    decay_embeddings: bool = False
    schedule: str = "cosine"  # cosine | wsd (warmup-stable-decay) | constant
    warmup_steps: int = 100
    decay_fraction: float = 0.2  # wsd: the last fraction of steps decays linearly to min_lr
    max_steps: int = 1000  # the horizon of the schedule (the trainer's max_steps)
    max_time_s: float | None = None  # a wall-clock budget: the schedule follows elapsed time
    # Muon only (conf/optim/muon.yaml explains each)
    momentum: float = 0.95
    nesterov: bool = True
    ns_steps: int = 5
    ns_coefficients: tuple[float, float, float] = (3.4445, -4.775, 2.0315)
    ns_eps: float = 1e-7
    adjust_lr_fn: str = "match_rms_adamw"  # original | match_rms_adamw
    adam_lr: float | None = None
    adam_weight_decay: float | None = None

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> OptimConfig:
        d = dict(d or {})
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise TinyLLMError(
                f"Unknown optim option(s) {unknown}; valid: {sorted(names)}. Fix `optim.*`."
            )
        if "ns_coefficients" in d:
            d["ns_coefficients"] = tuple(float(c) for c in d["ns_coefficients"])
        cfg = cls(**d)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        """Every bad value is named with its fix, before any training."""
        spec = lookup(self.name)
        if self.schedule not in ("cosine", "wsd", "constant"):
            raise TinyLLMError(
                f"optim.schedule={self.schedule!r} is not a schedule; use cosine, wsd or constant."
            )
        if self.lr <= 0 or self.max_steps <= 0 or self.warmup_steps < 0:
            raise TinyLLMError(
                f"optim.lr ({self.lr}) and optim.max_steps ({self.max_steps}) must be positive "
                f"and optim.warmup_steps ({self.warmup_steps}) non-negative."
            )
        spec.check(self)


# -- the parameter split ---------------------------------------------------------------------
def plain_name(name: str) -> str:
    """A parameter's name on the plain model, whatever wrappers sit around it."""
    for part in _WRAPPER_PARTS:
        name = name.replace(part, "")
    return name


def param_roles(model: nn.Module) -> dict[str, str]:
    """name -> 'hidden' (a 2-D matrix inside a block), 'embedding', 'matrix' (another 2-D
    weight: an untied LM head) or 'other' (norms, biases, scalars), from the plain model."""
    roles = {}
    for name, p in model.named_parameters():
        name = plain_name(name)
        if p.dim() != 2:
            roles[name] = "other"
        elif name in _EMBEDDINGS:
            roles[name] = "embedding"
        elif name.startswith("transformer.h."):
            roles[name] = "hidden"
        else:
            roles[name] = "matrix"
    return roles


def split_params(
    named: Iterable[tuple[str, nn.Parameter]], roles: dict[str, str]
) -> list[tuple[str, nn.Parameter]]:
    """(role, parameter) for the (possibly wrapped, possibly flattened) parameters, in model
    order, each role taken from its plain name."""
    out = []
    for name, p in named:
        if not p.requires_grad:
            continue
        key = plain_name(name)
        if key not in roles:
            raise TinyLLMError(
                f"parameter {name!r} is not in the model the optimizer groups were planned "
                "on; build the optimizer from the same model (a bug, please report it)."
            )
        out.append((roles[key], p))
    return out


def _pick(parts: list[tuple[str, nn.Parameter]], *roles: str) -> list[nn.Parameter]:
    return [p for role, p in parts if role in roles]


# -- the optimizers --------------------------------------------------------------------------
def _adamw(groups: list[dict[str, Any]], cfg: OptimConfig, fused_ok: bool) -> torch.optim.AdamW:
    # The fused AdamW kernel (CUDA, and CPU since torch 2.4) updates every parameter in one
    # pass; on the micro model it takes 0.7 ms a step on CPU where the multi-tensor (foreach)
    # path takes 2.5 ms. Older builds fall back to foreach. Under 16-mixed (fp16 with a
    # gradient scaler) the fused kernel unscales inside its step, after gradient clipping
    # would have run on scaled gradients: foreach there (fused_ok=False).
    kw = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    if fused_ok:
        try:
            return torch.optim.AdamW(groups, fused=True, **kw)
        except (RuntimeError, ValueError, TypeError):  # (no fused kernel)
            pass
    return torch.optim.AdamW(groups, foreach=True, **kw)


def build_adamw(
    parts: list[tuple[str, nn.Parameter]], cfg: OptimConfig, fused_ok: bool
) -> torch.optim.Optimizer:
    """Today's AdamW: matrices decay; norms, biases and (by default) embeddings don't (decay
    would pull a norm's gain or a rare token's embedding towards zero)."""
    emb = ("embedding",) if cfg.decay_embeddings else ()
    groups = [
        {"params": _pick(parts, "hidden", "matrix", *emb), "weight_decay": cfg.weight_decay},
        {"params": _pick(parts, "other", *(() if emb else ("embedding",))), "weight_decay": 0.0},
    ]
    return _adamw(groups, cfg, fused_ok)


def build_muon(
    parts: list[tuple[str, nn.Parameter]], cfg: OptimConfig, fused_ok: bool
) -> torch.optim.Optimizer:
    """Muon on the hidden matrices, AdamW (its own lr) on everything else."""
    muon = torch.optim.Muon(
        _pick(parts, "hidden"),
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        momentum=cfg.momentum,
        nesterov=cfg.nesterov,
        ns_coefficients=cfg.ns_coefficients,
        eps=cfg.ns_eps,
        ns_steps=cfg.ns_steps,
        adjust_lr_fn=cfg.adjust_lr_fn,
    )
    adam_lr = cfg.lr if cfg.adam_lr is None else cfg.adam_lr
    wd = cfg.weight_decay if cfg.adam_weight_decay is None else cfg.adam_weight_decay
    emb = ("embedding",) if cfg.decay_embeddings else ()
    groups = [
        {"params": _pick(parts, "matrix", *emb), "weight_decay": wd, "lr": adam_lr},
        {
            "params": _pick(parts, "other", *(() if emb else ("embedding",))),
            "weight_decay": 0.0,
            "lr": adam_lr,
        },
    ]
    return Combined([muon, _adamw(groups, cfg, fused_ok)])


def _check_adamw(cfg: OptimConfig) -> None:
    if not (0 <= cfg.beta1 < 1 and 0 <= cfg.beta2 < 1) or cfg.eps <= 0 or cfg.weight_decay < 0:
        raise TinyLLMError(
            f"optim.beta1={cfg.beta1}, optim.beta2={cfg.beta2}, optim.eps={cfg.eps}, "
            f"optim.weight_decay={cfg.weight_decay}: betas must lie in [0, 1), eps must be "
            "positive and weight_decay non-negative. Fix those values."
        )


def _check_muon(cfg: OptimConfig) -> None:
    _check_adamw(cfg)
    if not hasattr(torch.optim, "Muon"):
        raise TinyLLMError(
            f"optim=muon needs torch.optim.Muon, which this torch ({torch.__version__}) does "
            "not have (it arrived in torch 2.9). Upgrade torch, or train with optim=adamw."
        )
    problems = []
    if not 0 <= cfg.momentum < 1:
        problems.append(f"optim.momentum={cfg.momentum} must lie in [0, 1) (typical: 0.95)")
    if cfg.ns_steps < 1:
        problems.append(f"optim.ns_steps={cfg.ns_steps} must be at least 1 (typical: 5)")
    if cfg.adjust_lr_fn not in ("original", "match_rms_adamw"):
        problems.append(f"optim.adjust_lr_fn={cfg.adjust_lr_fn!r} must be original or "
                        "match_rms_adamw")  # fmt: skip
    if cfg.adam_lr is not None and cfg.adam_lr <= 0:
        problems.append(f"optim.adam_lr={cfg.adam_lr} must be positive (or null: same as lr)")
    if len(cfg.ns_coefficients) != 3 or cfg.ns_eps <= 0:
        problems.append("optim.ns_coefficients must be three numbers and optim.ns_eps positive")
    if cfg.adam_weight_decay is not None and cfg.adam_weight_decay < 0:
        problems.append(f"optim.adam_weight_decay={cfg.adam_weight_decay} must be >= 0")
    if problems:
        raise TinyLLMError("Bad Muon settings: " + "; ".join(problems) + ". Fix those values.")


@dataclass(frozen=True)
class OptimizerSpec:
    build: Callable[[list[tuple[str, nn.Parameter]], OptimConfig, bool], torch.optim.Optimizer]
    check: Callable[[OptimConfig], None]
    shards_ok: bool  # correct when each rank holds only a shard of a matrix (FSDP)


# The registry: one key per conf/optim/<key>.yaml.
OPTIMIZERS: dict[str, OptimizerSpec] = {
    "adamw": OptimizerSpec(build_adamw, _check_adamw, shards_ok=True),
    "muon": OptimizerSpec(build_muon, _check_muon, shards_ok=False),
}


def lookup(name: str) -> OptimizerSpec:
    if name not in OPTIMIZERS:
        raise TinyLLMError(
            f"optim={name!r} is not an optimizer; valid: {', '.join(sorted(OPTIMIZERS))} "
            "(one file each in conf/optim/). Choose one of those."
        )
    return OPTIMIZERS[name]


def check_strategy(cfg: OptimConfig, strategy: str) -> None:
    """Refuse optimizers that are wrong on sharded parameters (Muon under FSDP)."""
    if "fsdp" in strategy.lower() and not lookup(cfg.name).shards_ok:
        raise TinyLLMError(
            f"optim={cfg.name} cannot run under trainer.strategy={strategy}: FSDP gives each "
            "rank a flat shard of every weight, not whole matrices, and Muon has to "
            "orthogonalise the whole matrix. Use trainer.strategy=ddp (every rank holds the "
            "full averaged gradient, so the Muon update is exact), or keep FSDP with "
            "optim=adamw."
        )


def build_optimizer(
    named: Iterable[tuple[str, nn.Parameter]],
    roles: dict[str, str],
    cfg: OptimConfig,
    fused_ok: bool = True,
) -> torch.optim.Optimizer:
    """The optimizer `cfg.name` over `named` (the wrapped model's parameters), grouped by the
    roles planned on the plain model (`param_roles`)."""
    return lookup(cfg.name).build(split_params(named, roles), cfg, fused_ok)


class Combined(torch.optim.Optimizer):
    """Several optimizers over disjoint parameters, stepped as one.

    Lightning's automatic optimization drives exactly one optimizer, and one LR scheduler
    should drive every group: this object's `param_groups` are the children's own group
    dicts (so LambdaLR and gradient clipping see and change them all), `state` reads
    through to the children, and the state dict holds each child's state under its index.
    """

    def __init__(self, optimizers: list[torch.optim.Optimizer]) -> None:
        self.optimizers = optimizers
        super().__init__([g for o in optimizers for g in o.param_groups], {})
        self._link()

    def _link(self) -> None:
        # The children's own group dicts (Optimizer.__init__ appends them without copies) and
        # state mappings. A child's load_state_dict replaces both with new objects: relink,
        # or the LR schedule would change dicts no child reads any more.
        self.param_groups = [g for o in self.optimizers for g in o.param_groups]
        self.state = _States(self.optimizers)  # type: ignore[assignment]

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for opt in self.optimizers:
            opt.step()
        return loss

    def state_dict(self) -> dict[str, Any]:
        return {"combined": [o.state_dict() for o in self.optimizers]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        parts = state_dict.get("combined")
        if not isinstance(parts, list) or len(parts) != len(self.optimizers):
            raise TinyLLMError(
                "the checkpoint's optimizer state does not match this run's optimizer "
                f"({len(self.optimizers)} parts): resume with the same `optim=` the run was "
                "started with, or start fresh weights with init_from= instead of ckpt_path=."
            )
        for opt, sd in zip(self.optimizers, parts, strict=True):
            opt.load_state_dict(sd)
        self._link()


class _States(MutableMapping):
    """The children's `state` as one mapping; each parameter read and written in its own
    optimizer's state (a ChainMap would create entries in the first child's defaultdict)."""

    def __init__(self, optimizers: list[torch.optim.Optimizer]) -> None:
        self.optimizers = optimizers
        self.owner = {id(p): o for o in optimizers for g in o.param_groups for p in g["params"]}

    def __getitem__(self, p: torch.Tensor) -> Any:
        return self.owner[id(p)].state[p]

    def __setitem__(self, p: torch.Tensor, value: Any) -> None:
        self.owner[id(p)].state[p] = value

    def __delitem__(self, p: torch.Tensor) -> None:
        del self.owner[id(p)].state[p]

    def __iter__(self) -> Iterator[torch.Tensor]:
        return (p for o in self.optimizers for p in o.state)

    def __len__(self) -> int:
        return sum(len(o.state) for o in self.optimizers)
