"""Run-health telemetry: what each layer is doing, and loss/gradient spikes as they happen.

When a small run plateaus or spikes, train/loss and the global gradient norm say *that*
something went wrong, not *where*. Large-model trainers watch every layer (OLMo's gradient,
activation and parameter monitors) because the early signs show up there: an update that is
large next to its weights (update/param RMS ratio), a residual stream whose scale keeps
growing, attention collapsing onto one key (entropy -> 0), logits drifting up. This callback
logs those figures under `health/` every `health.every_n_steps` steps:

    per layer (embed, block_00 .. block_NN, ln_f, head when untied)
        health/grad_rms/<layer>      RMS of the gradients (before clipping), all ranks' average
        health/param_rms/<layer>     RMS of the weights the step started from
        health/update_ratio/<layer>  RMS(step actually taken) / RMS(weights), any optimizer
    per block, on the first `health.rows` rows of the step's batch (rank 0's)
        health/resid_rms/<block>     RMS of the residual stream after the block
        health/attn_entropy/<block>  mean attention entropy (nats) over heads and queries
    health/max_abs_logit, health/z_loss (when model.z_loss > 0), health/loss_scale (16-mixed)

and checks EVERY step for spikes: a step whose loss (or the log of its pre-clip gradient norm)
lies more than `spike_threshold` standard deviations above the mean of the previous
`spike_window` steps.
`on_spike=warn` records and prints it; `on_spike=skip` also drops that step's update (no
weight, moment or step-count change: the optimizer sees no gradients). Every spike lands in
metrics.json (`health.spikes`) and TensorBoard (`health/spike_z`). `python -m tinyllm.inspect
run=RUN_DIR step=N` then prints the text that step trained on.

Cost: `warn` collects the per-step values on the device and reads them once per logging
window (no extra host sync per step); `skip` has to decide before the update, so it reads
two numbers each step (one sync; under DDP also one small all-reduce of the loss).
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch

from tinyllm.errors import TinyLLMError

_BLOCK = re.compile(r"^transformer\.h\.(\d+)\.")


@dataclass
class HealthConfig:
    every_n_steps: int | None = 50  # telemetry interval; None turns telemetry off
    rows: int = 1  # batch rows for the activation statistics (rank 0's first rows)
    spikes: bool = True  # run the spike detector on every step
    spike_window: int = 50  # steps of history for the running mean and deviation
    spike_threshold: float = 6.0  # z-score above which a step is a spike
    spike_min_history: int = 20  # no verdict before this many steps of history
    on_spike: str = "warn"  # warn | skip
    skip_steps: list[int] = field(default_factory=list)  # drop these steps' updates (replays)

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> HealthConfig:
        d = dict(d or {})
        unknown = sorted(set(d) - set(cls.__dataclass_fields__))
        if unknown:
            raise TinyLLMError(
                f"Unknown health option(s) {unknown}; valid: "
                f"{sorted(cls.__dataclass_fields__)}. Fix or remove `health.*` on the command line."
            )
        cfg = cls(**d)
        cfg.skip_steps = [int(s) for s in (cfg.skip_steps or [])]
        problems = []
        if cfg.every_n_steps is not None and int(cfg.every_n_steps) < 1:
            problems.append(
                f"health.every_n_steps={cfg.every_n_steps} must be a positive number of steps "
                "(or null to turn telemetry off)"
            )
        if cfg.rows < 1:
            problems.append(f"health.rows={cfg.rows} must be at least 1")
        if cfg.spike_window < 2 or cfg.spike_min_history < 2:
            problems.append("health.spike_window and health.spike_min_history must be >= 2")
        if not cfg.spike_threshold > 0:
            problems.append(f"health.spike_threshold={cfg.spike_threshold} must be positive")
        if cfg.on_spike not in ("warn", "skip"):
            problems.append(f"health.on_spike={cfg.on_spike!r} must be 'warn' or 'skip'")
        if problems:
            raise TinyLLMError("; ".join(problems) + ". Fix the value(s) in `health.*`.")
        return cfg


# ----------------------------------------------------------------------- spike detection


class SpikeDetector:
    """Running mean and standard deviation over the last `window` accepted values.

    A value more than `threshold` deviations above the mean is a spike (only upward moves
    count: a falling loss is good news). Spikes stay out of the history, so one bad step does
    not raise the bar for the next. A non-finite value is always a spike (z = inf)."""

    def __init__(
        self, window: int, threshold: float, min_history: int, log_scale: bool = False
    ) -> None:
        self.window, self.threshold, self.min_history = window, threshold, min_history
        self.log_scale = log_scale
        self.values: list[float] = []

    def z_score(self, v: float) -> float | None:
        if not math.isfinite(v):
            return math.inf
        if self.log_scale:
            v = math.log(max(v, 1e-30))
        if len(self.values) < self.min_history:
            return None
        n = len(self.values)
        mean = sum(self.values) / n
        std = math.sqrt(sum((x - mean) ** 2 for x in self.values) / (n - 1))
        # a floor on the deviation: a perfectly flat history would make any wiggle "infinite"
        std = max(std, 1e-3 * abs(mean), 1e-12)
        return (v - mean) / std

    def update(self, v: float) -> float | None:
        """Feed one value; returns its z-score when it is a spike, else None."""
        z = self.z_score(v)
        if z is not None and z > self.threshold:
            return z
        self.values.append(math.log(max(v, 1e-30)) if self.log_scale else v)
        del self.values[: -self.window]
        return None

    def state_dict(self) -> dict[str, Any]:
        return {"values": list(self.values)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.values = [float(v) for v in state.get("values", [])]


# ----------------------------------------------------------------------- per-layer statistics


def layer_name(param_name: str, n_layer: int) -> str:
    """`transformer.h.3.attn.c_attn.weight` -> `block_03`; embeddings, final norm and head."""
    m = _BLOCK.match(param_name)
    if m:
        return f"block_{int(m.group(1)):0{len(str(max(n_layer - 1, 0)))}d}"
    if param_name.startswith(("transformer.wte.", "pos.")):
        return "embed"
    if param_name.startswith("transformer.ln_f."):
        return "ln_f"
    if param_name.startswith("lm_head."):
        return "head"
    return param_name.rsplit(".", 1)[0]


def grouped_rms(tensors: list[torch.Tensor], groups: list[str]) -> dict[str, float]:
    """RMS over all elements of the tensors of each group: sqrt(sum of squares / count)."""
    norms = torch._foreach_norm([t.float() for t in tensors], 2)  # one multi-tensor pass
    sq = torch.stack(norms).double().pow(2).tolist()  # one host read
    total: dict[str, list[float]] = {}
    for g, s, t in zip(groups, sq, tensors):
        acc = total.setdefault(g, [0.0, 0.0])
        acc[0] += s
        acc[1] += t.numel()
    return {g: math.sqrt(s / n) for g, (s, n) in total.items()}


def attention_entropy(attn: torch.Tensor) -> float:
    """Mean entropy (nats) of attention rows (B, H, T, T): 0 = one key, ln(t) = uniform."""
    p = attn.float()
    return float(-(p * torch.log(p.clamp_min(1e-30))).sum(-1).mean())


@torch.no_grad()
def activation_stats(model: Any, idx: torch.Tensor) -> dict[str, float]:
    """Residual-stream RMS and attention entropy per block, max |logit| and z-loss, for idx.

    Runs the model's eager forward (`model.forward`, never a compiled wrapper) on the manual
    attention path (`return_attn=True`), with a hook on each block for its output."""
    resid: list[float] = []

    def hook(module: Any, args: Any, output: Any) -> None:
        x = output[0]  # (B, T, C): the residual stream after the block
        resid.append(float(x.float().pow(2).mean().sqrt()))

    blocks = list(model.transformer.h)
    handles = [b.register_forward_hook(hook) for b in blocks]
    try:
        logits, attns = model.forward(idx, return_attn=True)  # (B, T, V), n_layer x (B, H, T, T)
    finally:
        for h in handles:
            h.remove()
    width = len(str(max(len(blocks) - 1, 0)))
    out: dict[str, float] = {}
    for i, (r, a) in enumerate(zip(resid, attns)):
        out[f"health/resid_rms/block_{i:0{width}d}"] = r
        out[f"health/attn_entropy/block_{i:0{width}d}"] = attention_entropy(a)
    logits = logits.float()
    out["health/max_abs_logit"] = float(logits.abs().max())
    z = float(getattr(model.config, "z_loss", 0.0) or 0.0)
    if z > 0:
        out["health/z_loss"] = z * float(torch.logsumexp(logits, dim=-1).pow(2).mean())
    return out


# ----------------------------------------------------------------------- the callback


class HealthMonitor(L.Callback):
    """Per-layer telemetry every `every_n_steps` steps and a spike check on every step."""

    def __init__(self, config: HealthConfig | dict[str, Any] | None = None) -> None:
        self.cfg = config if isinstance(config, HealthConfig) else HealthConfig.from_dict(config)
        c = self.cfg
        self.loss_spikes = SpikeDetector(c.spike_window, c.spike_threshold, c.spike_min_history)
        # Gradient norms move by factors (a healthy run's norm doubles and halves within a
        # few steps early on): their deviations are measured on a log scale. The loss is a
        # log-probability already, so its own scale is the right one.
        self.grad_spikes = SpikeDetector(
            c.spike_window, c.spike_threshold, c.spike_min_history, log_scale=True
        )
        self.spikes: list[dict[str, Any]] = []
        self.skipped: list[int] = []
        self.max_grad_norm: float | None = None
        self.last: dict[str, float] = {}  # the latest telemetry figures
        self._names: list[str] = []
        self._params: list[torch.nn.Parameter] = []
        self._groups: list[str] = []
        self._step_loss: torch.Tensor | None = None  # this step's loss, summed over micro-batches
        self._pending: list[tuple[int, torch.Tensor, torch.Tensor]] = []  # warn: (step, loss, gn)
        self._awaiting_norm: tuple[int, torch.Tensor] | None = None  # (step, loss) until clipped
        self._snapshot: list[torch.Tensor] | None = None
        self._snap_step = -1
        self._stats: dict[str, float] = {}
        self.batches: dict[str, Any] | None = None  # for `python -m tinyllm.inspect`

    # -- set-up -------------------------------------------------------------------------------
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        model = pl_module.model
        n_layer = int(model.config.n_layer)
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self._names = [n for n, _ in named]
        self._params = [p for _, p in named]
        self._groups = [layer_name(n, n_layer) for n in self._names]
        self._sharded = "FSDP" in type(trainer.strategy).__name__
        if self._sharded and self.cfg.every_n_steps:
            pl_module.print(
                "health: per-layer telemetry is off under FSDP (weights and gradients are "
                "sharded); the spike detector still runs."
            )

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # (after a resume has restored the data module's seed)
        self.batches = _batch_layout(trainer)

    def _is_health_step(self, step: int) -> bool:
        every = self.cfg.every_n_steps
        return bool(every) and not self._sharded and step % int(every) == 0

    # -- per step -----------------------------------------------------------------------------
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        step = trainer.global_step
        accum = int(trainer.accumulate_grad_batches)
        first_micro = batch_idx % accum == 0
        if first_micro:
            self._step_loss = None
        if first_micro and trainer.is_global_zero and self._is_health_step(step):
            x = batch[0][: self.cfg.rows]  # (rows, T)
            model = pl_module.model
            was_training = model.training
            model.eval()  # no dropout in a measurement
            try:
                self._stats = activation_stats(model, x)
            finally:
                model.train(was_training)

    def on_before_backward(self, trainer, pl_module, loss: torch.Tensor) -> None:
        # Lightning hands over the loss already divided by accumulate_grad_batches, so the sum
        # over a step's micro-batches is that step's mean loss.
        d = loss.detach().float()
        self._step_loss = d if self._step_loss is None else self._step_loss + d

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        step = trainer.global_step  # 0-based index of the step about to be taken
        if trainer.is_global_zero and self._is_health_step(step):
            self._stats.update(self._prefix("grad_rms", self._grad_rms()))
            # the weights this step starts from: the update is measured against them
            self._snapshot = [p.detach().clone() for p in self._params]
            self._snap_step = step
        grads = [p.grad for p in self._params if p.grad is not None]
        if self.cfg.spikes and grads and self._step_loss is not None:
            if (
                self.cfg.on_spike == "warn"
                and step not in self.cfg.skip_steps
                and (_norm_from_clipping(pl_module))
            ):
                # LitGPT's clipping pass measures this step's pre-clip norm anyway: read it
                # at batch end instead of a second pass over the gradients on the hot path
                self._awaiting_norm = (step, self._step_loss)
            else:
                gn = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads, 2)))
                if self.cfg.on_spike == "skip":
                    loss = trainer.strategy.reduce(self._step_loss, reduce_op="mean")
                    if self._check(step, float(loss), float(gn), pl_module):
                        self._drop_update(trainer, optimizer, step)
                else:
                    self._pending.append((step, self._step_loss, gn))
        if step in self.cfg.skip_steps:
            self._drop_update(trainer, optimizer, step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step  # steps done
        if self._awaiting_norm is not None and step > self._awaiting_norm[0]:
            s, loss = self._awaiting_norm
            self._pending.append((s, loss, pl_module.last_grad_norm.detach()))
            self._awaiting_norm = None
        if self._snapshot is not None and step > self._snap_step:
            self._finish_health_step(trainer, pl_module)
        every = max(1, int(trainer.log_every_n_steps or 1))
        if self._pending and (step % every == 0 or step >= int(trainer.max_steps or -1) > 0):
            self._flush_pending(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        self._flush_pending(trainer, pl_module)

    # -- pieces -------------------------------------------------------------------------------
    def _grad_rms(self) -> dict[str, float]:
        pairs = [(p.grad, g) for p, g in zip(self._params, self._groups) if p.grad is not None]
        return grouped_rms([t for t, _ in pairs], [g for _, g in pairs]) if pairs else {}

    def _finish_health_step(self, trainer, pl_module) -> None:
        old, self._snapshot = self._snapshot, None
        deltas = [p.detach() - o for p, o in zip(self._params, old)]
        param_rms = grouped_rms(old, self._groups)
        update_rms = grouped_rms(deltas, self._groups)
        ratio = {g: update_rms[g] / param_rms[g] if param_rms[g] > 0 else 0.0 for g in param_rms}
        stats = dict(self._stats)
        stats.update(self._prefix("param_rms", param_rms))
        stats.update(self._prefix("update_ratio", ratio))
        scaler = getattr(getattr(trainer, "precision_plugin", None), "scaler", None)
        if scaler is not None:
            stats["health/loss_scale"] = float(scaler.get_scale())
        self._stats = {}
        self.last = {"step": self._snap_step, **stats}
        self._log(trainer, stats, self._snap_step)

    @staticmethod
    def _prefix(kind: str, values: dict[str, float]) -> dict[str, float]:
        return {f"health/{kind}/{g}": v for g, v in values.items()}

    def _flush_pending(self, trainer, pl_module) -> None:
        """warn mode: read the window's per-step values once and run the detector over them."""
        if not self._pending:
            return
        steps = [s for s, _, _ in self._pending]
        losses = torch.stack([loss for _, loss, _ in self._pending])
        norms = torch.stack([gn for _, _, gn in self._pending])
        self._pending = []
        losses = trainer.strategy.reduce(losses, reduce_op="mean")  # every rank's loss
        for s, loss, gn in zip(steps, losses.tolist(), norms.tolist()):
            self._check(s, loss, gn, pl_module)

    def _check(self, step: int, loss: float, grad_norm: float, pl_module) -> bool:
        """Run both detectors on one step; record, log and print a spike. True if a spike."""
        if math.isfinite(grad_norm):
            self.max_grad_norm = max(self.max_grad_norm or 0.0, grad_norm)
        z_loss = self.loss_spikes.update(loss)
        z_grad = self.grad_spikes.update(grad_norm)
        if z_loss is None and z_grad is None:
            return False
        rec = {
            "step": step,
            "loss": loss,
            "grad_norm": grad_norm,
            "z_loss": z_loss,
            "z_grad_norm": z_grad,
            "action": self.cfg.on_spike,
        }
        self.spikes.append(rec)
        z = max(v for v in (z_loss, z_grad) if v is not None)
        self._log(pl_module.trainer, {"health/spike_z": z if math.isfinite(z) else 1e30}, step)
        which = " and ".join(
            n for n, v in (("loss", z_loss), ("gradient norm", z_grad)) if v is not None
        )
        pl_module.print(
            f"health: {which} spike at step {step} (loss {loss:.4g}, grad norm {grad_norm:.4g}, "
            f"z {z:.1f}); {'update skipped' if self.cfg.on_spike == 'skip' else 'kept'}. "
            f"See the batch: python -m tinyllm.inspect run=<run dir> step={step}"
        )
        return True

    def _drop_update(self, trainer, optimizer, step: int) -> None:
        """Skip this step's update on every rank: the optimizer sees no gradients at all."""
        scaler = getattr(getattr(trainer, "precision_plugin", None), "scaler", None)
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if scaler is not None:
                    # a GradScaler insists on seeing gradients: non-finite ones make it skip
                    # the step itself (and lower its scale, which it regrows later)
                    p.grad.fill_(float("nan"))
                else:
                    p.grad = None
        if step not in self.skipped:
            self.skipped.append(step)

    @staticmethod
    def _log(trainer, metrics: dict[str, float], step: int) -> None:
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=step)

    # -- results ------------------------------------------------------------------------------
    def metrics_json(self) -> dict[str, Any]:
        """The `health` section of metrics.json."""
        last_block = sorted(k for k in self.last if k.startswith("health/update_ratio/block_"))
        return {
            "health": {
                "config": asdict(self.cfg),
                "figures": "gradients, weights and updates: after DDP's all-reduce (the same "
                "on every rank); activations: rank 0's first health.rows rows; spikes: the loss "
                "averaged over ranks",
                "max_grad_norm": self.max_grad_norm,
                "spike_count": len(self.spikes),
                "spikes": self.spikes,
                "skipped_steps": sorted(self.skipped),
                "last_layer_update_ratio": self.last.get(last_block[-1]) if last_block else None,
                "batches": self.batches,
                "last": self.last,
            }
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "loss": self.loss_spikes.state_dict(),
            "grad": self.grad_spikes.state_dict(),
            "spikes": self.spikes,
            "skipped": self.skipped,
            "max_grad_norm": self.max_grad_norm,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loss_spikes.load_state_dict(state.get("loss", {}))
        self.grad_spikes.load_state_dict(state.get("grad", {}))
        self.spikes = list(state.get("spikes", []))
        self.skipped = list(state.get("skipped", []))
        self.max_grad_norm = state.get("max_grad_norm")


def _norm_from_clipping(pl_module: Any) -> bool:
    """Whether LitGPT's clipping pass measures the global pre-clip gradient norm this step."""
    fn = getattr(pl_module, "grad_norm_from_clipping", None)
    return fn is not None and bool(fn())


def _batch_layout(trainer: L.Trainer) -> dict[str, Any] | None:
    """What rebuilds any training batch of a token-bin run (see tinyllm/inspect.py)."""
    dm = getattr(trainer, "datamodule", None)
    if dm is None or not hasattr(dm, "train_dataset") or not hasattr(dm, "data_dir"):
        return None  # (Q&A data: batches are not a function of the step alone)
    return {
        "data_dir": str(Path(dm.data_dir).resolve()),
        "dtype": str(dm.meta["dtype"]),
        "seed": int(dm.seed),
        "block_size": int(dm.block_size),
        "batch_size": int(dm.batch_size),
        "world_size": int(trainer.world_size),
        "accumulate_grad_batches": int(trainer.accumulate_grad_batches),
    }
