"""LitGPT: the LightningModule around the plain GPT.

Lightning owns the loop, precision, devices and checkpoints; this file owns what is specific to
language modelling: the loss (with optional z-loss), bits per byte, the optimizer's parameter
groups and the learning-rate schedule. The constructor takes plain values only, so a checkpoint
rebuilds the module (and `tinyllm.load_checkpoint` the bare GPT) without the conf/ tree.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F

from tinyllm.chat import IGNORE_INDEX
from tinyllm.checkpoint import CKPT_FORMAT_VERSION
from tinyllm.data.protocol import split_bytes
from tinyllm.errors import TinyLLMError
from tinyllm.io import strip_compile_prefix
from tinyllm.model import GPT, ModelConfig
from tinyllm.optim import OptimConfig, build_optimizer, check_strategy, param_roles
from tinyllm.parallel import agree_window, refuse_skip_with_ranks
from tinyllm.perf import FastSetattr


def lr_factor(step: int, cfg: OptimConfig) -> float:
    """Multiplier of the base LR at `step`: linear warmup, then cosine / WSD / constant."""
    min_ratio = (cfg.min_lr if cfg.min_lr is not None else cfg.lr / 10) / cfg.lr
    if step < cfg.warmup_steps:
        return (step + 1) / (cfg.warmup_steps + 1)
    if cfg.schedule == "constant":
        return 1.0
    if cfg.schedule == "wsd":
        decay_start = int(cfg.max_steps * (1 - cfg.decay_fraction))
        if step < decay_start:
            return 1.0
        frac = min(1.0, (step - decay_start) / max(1, cfg.max_steps - decay_start))
        return 1.0 - (1.0 - min_ratio) * frac
    # cosine from 1 down to min_ratio over [warmup, max_steps], flat afterwards
    frac = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
    return min_ratio + 0.5 * (1.0 - min_ratio) * (1.0 + math.cos(math.pi * frac))


class DivergenceError(RuntimeError):
    """The training loss became NaN or infinite."""


# Attributes written on every step: Lightning's hook bookkeeping (`_current_fx_name`, set
# about 45 times a step) and our counters. None is a parameter, buffer or sub-module, so they
# skip nn.Module.__setattr__'s registry checks (see LitGPT.__setattr__).
class LitGPT(FastSetattr, L.LightningModule):
    # set every step or every hook: plain attributes, never parameters or modules (perf.py)
    _plain_attrs = frozenset(
        {
            "_current_fx_name",
            "tokens_seen",
            "_loss_sum",
            "_loss_count",
            "_loss_logged_at",
            "_world",
            "last_grad_norm",
        }
    )  # (step_metrics is a dict updated in place)

    def __init__(
        self,
        model_config: dict[str, Any],
        tokenizer: dict[str, Any] | None = None,
        optim: dict[str, Any] | None = None,
        data_meta: dict[str, Any] | None = None,
        chat_template: dict[str, Any] | None = None,
        nan_policy: str = "stop",
        ckpt_format_version: int = CKPT_FORMAT_VERSION,
    ) -> None:
        super().__init__()
        if nan_policy not in ("stop", "skip"):
            raise TinyLLMError(f"nan_policy={nan_policy!r}: use 'stop' or 'skip'.")
        # Plain values only: the checkpoint must rebuild everything from its hyper-parameters.
        # logger=False: the tokenizer and meta are large; train.py logs a flat hparams table.
        self.save_hyperparameters(logger=False)
        self.model = GPT(ModelConfig.from_dict(model_config))
        # Counted once, here, before any wrapping: under FSDP the model's parameters become
        # this rank's shards, and counting them then would divide params and MFU by the ranks.
        self.n_params = self.model.num_params()
        self.flops_per_token = self.model.flops_per_token()
        self.optim_cfg = OptimConfig.from_dict(optim)
        # Optimizer groups are planned here, on the plain model: FSDP later hands
        # configure_optimizers flat 1-D shards whose shapes no longer tell a matrix apart.
        self.param_roles = param_roles(self.model)
        self.nan_policy = nan_policy
        # bits per byte = nats per token / ln 2 * tokens per byte (of the validation split)
        self.tokens_per_byte = _tokens_per_byte(data_meta)
        # Sums (not means) so DDP ranks with uneven shards still give the exact corpus mean.
        # Plain float64 tensors, not metric states: torchmetrics' SumMetric drops NaN (a
        # diverged run reported val/loss 0.0 and ranked best), and precision=bf16-true casts
        # metric states to bf16 (8 bits of mantissa for a sum over the whole val split).
        self._val_sums: torch.Tensor | None = None  # [nll sum, target count], float64
        self.val_results: dict[str, float] = {}  # the latest validation's figures, exact
        self.tokens_seen = 0
        self.skipped_steps = 0
        self.last_val_step = -1  # the global step of the latest validation (every rank)
        self._t_train_start: float | None = None
        self._world: int | None = None  # the trainer's world size, read once per fit
        self._loss_sum: torch.Tensor | None = None  # train loss summed over the log window
        self._loss_count = 0
        self._loss_logged_at = -1  # global step of the latest train/loss log
        self._elapsed_s = 0.0  # rank 0's seconds of training at the latest window (every rank)
        self.step_metrics: dict[str, float] = {}  # latest train/* values (log_step_metrics)

    # -- the model ---------------------------------------------------------------------------
    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.model(idx)

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean cross entropy over non-ignored targets, plus the optional z-loss."""
        B, T, V = logits.shape
        flat = logits.reshape(B * T, V).float()  # (B*T, V); fp32 for a stable log-softmax
        loss = F.cross_entropy(flat, targets.reshape(B * T), ignore_index=IGNORE_INDEX)
        z = self.model.config.z_loss
        if z > 0:
            # z-loss (PaLM): keeps the softmax normaliser near 1 so logits don't drift. The
            # mean over kept targets is a masked sum / count: `flat[mask]` would make the host
            # wait for the device every step (the size of a boolean selection is data).
            mask = (targets.reshape(B * T) != IGNORE_INDEX).to(flat.dtype)  # (B*T,)
            lse2 = torch.logsumexp(flat, dim=-1).pow(2)  # (B*T,)
            loss = loss + z * (lse2 * mask).sum() / mask.sum().clamp(min=1)
        return loss

    # -- steps -------------------------------------------------------------------------------
    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int):
        x, y = batch
        loss = self.loss(self.model(x), y)
        if self.nan_policy == "skip" and not torch.isfinite(loss):  # a per-step decision
            self.skipped_steps += 1
            self.print(f"warning: skipping the step: {self._nan_message(loss.item())}")
            return None  # Lightning skips backward and the optimizer step
        if self._world is None:
            self._world = self.trainer.world_size
        self.tokens_seen += x.numel() * self._world
        # The loss is summed on the device and logged as the mean over the logging window
        # (on_train_batch_end): no per-step `self.log` (about 0.7 ms on a CPU) and no per-step
        # device sync; nan_policy=stop checks that window sum.
        detached = loss.detach()
        self._loss_sum = detached if self._loss_sum is None else self._loss_sum + detached
        self._loss_count += 1
        return loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = self.global_step
        if step == self._loss_logged_at or self._loss_sum is None:
            return  # (with gradient accumulation, several micro-batches share one step)
        every = max(1, int(self.trainer.log_every_n_steps or 1))
        max_steps = int(self.trainer.max_steps or -1)
        if step % every == 0 or step == max_steps or self.trainer.should_stop:
            self._flush_train_loss()

    def _flush_train_loss(self) -> None:
        """Log the window's mean train/loss; with nan_policy=stop, stop if it is non-finite."""
        if self._loss_sum is None:
            return
        # one collective and one device sync per window: every rank gets the same mean over
        # all ranks' steps (so all stop together on a NaN) and rank 0's clock (the schedule)
        value, self._elapsed_s = agree_window(self._loss_sum, self._loss_count, self._t_train_start)
        first = self._loss_logged_at + 1
        self._loss_sum, self._loss_count = None, 0
        self._loss_logged_at = self.global_step
        if not math.isfinite(value):
            raise DivergenceError(self._nan_message(value, f"in steps {first}..{self.global_step}"))
        self.log_step_metrics({"train/loss": value})

    def log_step_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        """Write train/* figures of the step that just finished straight to the loggers.

        Lightning's `self.log` costs ~0.4 ms per key on a CPU (it moves a result object
        between devices on every call), which at ~6 keys per logging step is a measurable
        share of a short step. These figures need none of its reductions: they are plain
        floats, written by rank zero with Lightning's own step index for training logs
        (steps done - 1), and kept in `step_metrics` for the progress bar and metrics.json.
        """
        self.step_metrics.update(metrics)
        trainer = self.trainer
        if trainer.is_global_zero:
            step = max(0, trainer.global_step - 1) if step is None else step
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=step)

    def _nan_message(self, value: float, where: str | None = None) -> str:
        return (
            f"non-finite training loss ({value}) {where or f'at step {self.global_step}'}. "
            "Lower optim.lr, raise optim.warmup_steps, enable gradient clipping "
            "(trainer.gradient_clip_val) or use precision 32-true."
        )

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int):
        x, y = batch
        logits = self.model(x)
        B, T, V = logits.shape
        nll = F.cross_entropy(
            logits.reshape(B * T, V).float(),  # (B*T, V)
            y.reshape(B * T),
            ignore_index=IGNORE_INDEX,
            reduction="sum",
        )
        n = (y != IGNORE_INDEX).sum()
        # (MPS has no float64: accumulate there on the CPU)
        dev = "cpu" if nll.device.type == "mps" else nll.device
        pair = torch.stack([nll.double(), n.double()]).to(dev)  # no host sync on CUDA
        self._val_sums = pair if self._val_sums is None else self._val_sums + pair

    def on_validation_epoch_start(self) -> None:
        self._val_sums = None

    def on_validation_epoch_end(self) -> None:
        self.last_val_step = self.global_step
        sums = self._val_sums
        if sums is None:
            sums = torch.zeros(2, dtype=torch.float64, device=self.device)
        self._val_sums = None
        trainer = self._trainer  # (None when called outside a fit, e.g. in tests)
        if trainer is not None and trainer.world_size > 1:  # every rank's shard: exact sums
            sums = trainer.strategy.reduce(sums, reduce_op="sum")
        nll, n = (float(v) for v in sums.cpu())
        if n == 0:
            return
        val_loss = nll / n  # NaN stays NaN: a diverged model is reported, never ranked
        results = {"val/loss": val_loss, "val/ppl": math.exp(min(val_loss, 30.0))}
        if self.tokens_per_byte is not None:
            results["val/bpb"] = val_loss / math.log(2) * self.tokens_per_byte
        else:  # bytes unknown: bits per token, under its own name (never passed off as bpb)
            results["val/bits_per_token"] = val_loss / math.log(2)
        self.val_results = results
        # (float64 tensors: Lightning keeps their dtype, where floats become default-dtype)
        logged = {k: torch.tensor(v, dtype=torch.float64) for k, v in results.items()}
        self.log_dict(logged, prog_bar=True, sync_dist=False)

    # -- optimizer ---------------------------------------------------------------------------
    def configure_optimizers(self):
        """The optimizer named by `optim.name` (tinyllm/optim.py) and the LR schedule."""
        trainer = self._trainer
        strategy = getattr(trainer, "strategy", None)
        check_strategy(self.optim_cfg, "" if strategy is None else type(strategy).__name__)
        # fused AdamW only without a gradient scaler (16-mixed): see tinyllm/optim.py
        fused_ok = _grad_scaler(trainer) is None
        named = self.model.named_parameters()  # (flat shards under FSDP: mapped by name)
        opt = build_optimizer(named, self.param_roles, self.optim_cfg, fused_ok)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, self._lr_lambda)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        """Clip by global norm (trainer.gradient_clip_val), keeping the norm it measures.

        One pass gives both the clipping and `train/grad_norm` (before clipping, logged on
        logging steps), so no second pass over the gradients. Under FSDP the norm has to be
        taken over every rank's shards: FSDP's own `clip_grad_norm_` does that (Lightning's
        default clipping supports only clipping by value there), also under 16-mixed:
        Lightning's FSDP precision plugin refuses norm clipping, but it has unscaled the
        gradients by the time this hook runs. Clipping by value, or with a gradient scaler
        without FSDP, goes through Lightning's own path (which unscales, then clips).
        """
        if (
            not gradient_clip_val
            or gradient_clip_algorithm == "value"
            or not self.grad_norm_from_clipping()
        ):
            super().configure_gradient_clipping(
                optimizer, gradient_clip_val, gradient_clip_algorithm
            )
            return
        trainer = self.trainer
        wrapped = trainer.strategy.model
        if _is_fsdp(wrapped):
            norm = wrapped.clip_grad_norm_(gradient_clip_val)
        else:
            params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
            norm = torch.nn.utils.clip_grad_norm_(params, gradient_clip_val)
        self.last_grad_norm = norm  # (a device tensor: the health callback reads it, no sync)
        step = trainer.global_step  # the step about to finish (0-based)
        if (step + 1) % max(1, int(trainer.log_every_n_steps or 1)) == 0:
            self.log_step_metrics({"train/grad_norm": float(norm)}, step=step)

    def grad_norm_from_clipping(self) -> bool:
        """Whether configure_gradient_clipping measures and logs train/grad_norm this run."""
        trainer = self.trainer
        if not trainer.gradient_clip_val or trainer.gradient_clip_algorithm == "value":
            return False
        if _is_fsdp(trainer.strategy.model):
            return True  # the root FSDP module (Lightning wraps the whole LightningModule)
        if _grad_scaler(trainer) is not None:
            return False  # (Lightning unscales, then clips)
        return "FSDP" not in type(trainer.strategy).__name__

    def _lr_lambda(self, step: int) -> float:
        cfg = self.optim_cfg
        if cfg.max_time_s and self._t_train_start is not None and step >= cfg.warmup_steps:
            # With a time budget the run ends when time is up, not at max_steps: decay by
            # whichever is further along, elapsed time or steps, so the LR has decayed by the end.
            # The time is rank 0's, agreed at each logging window: every rank's own clock would
            # give each DDP replica its own LR, and the replicas would drift apart.
            elapsed = self._elapsed_s
            step = max(step, int(cfg.max_steps * min(1.0, elapsed / cfg.max_time_s)))
        return lr_factor(step, cfg)

    def setup(self, stage: str) -> None:
        refuse_skip_with_ranks(self.nan_policy, self.trainer.world_size)

    def on_train_start(self) -> None:
        self._t_train_start = time.monotonic()
        self._elapsed_s = 0.0
        self._world = None
        self._loss_sum, self._loss_count = None, 0
        self._loss_logged_at = self.global_step  # (restored by now when resuming)
        self.step_metrics.clear()

    # -- checkpoint extras -------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.nan_policy == "stop" and self._loss_sum is not None:
            # (every rank saves, so every rank takes part; the window's figure is agreed)
            value, _ = agree_window(self._loss_sum, self._loss_count, self._t_train_start)
            if not math.isfinite(value):
                self._flush_train_loss()  # raises: never checkpoint weights trained on NaN
        checkpoint["tinyllm"] = {
            "tokens_seen": self.tokens_seen,
            "skipped_steps": self.skipped_steps,
            "optim": asdict(self.optim_cfg),
        }
        # Never write keys of a compiled wrapper: checkpoints must load into a plain GPT.
        strip_compile_prefix(checkpoint["state_dict"])

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        extra = checkpoint.get("tinyllm", {})
        self.tokens_seen = int(extra.get("tokens_seen", 0))
        self.skipped_steps = int(extra.get("skipped_steps", 0))


def _tokens_per_byte(meta: dict[str, Any] | None) -> float | None:
    """Validation tokens per UTF-8 byte, or None when the bytes are not known."""
    n_bytes = split_bytes(meta, "val")
    return None if n_bytes is None else float(meta["splits"]["val"]["tokens"]) / n_bytes  # type: ignore[index]


def selection_metric(meta: dict[str, Any] | None) -> str:
    """The validation metric LitGPT logs for this data, which best.ckpt is chosen by."""
    return "val/bpb" if split_bytes(meta, "val") is not None else "val/bits_per_token"


def _grad_scaler(trainer: Any) -> Any:
    """The trainer's gradient scaler (16-mixed with a scaler), or None."""
    return getattr(getattr(trainer, "precision_plugin", None), "scaler", None)


def _is_fsdp(module: Any) -> bool:
    """True for a module wrapped by torch's FullyShardedDataParallel (Lightning's FSDP)."""
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:  # (torch built without distributed)
        return False
    return isinstance(module, FullyShardedDataParallel)
