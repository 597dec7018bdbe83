"""What the hardware can do: the precision `auto` picks, the peak FLOP/s behind MFU, TF32.

Each answer here is either measured from the device or looked up exactly; a guess would be
worse than none. An MFU computed against the wrong GPU's peak is off by 3x and looks
plausible, so an unknown GPU gets no MFU (and says so) instead of a near match by name.
"""

from __future__ import annotations

from pathlib import Path

import torch

# Peak dense (no sparsity) bf16 tensor-core TFLOP/s, keyed by the exact name
# torch.cuda.get_device_name() reports. Sources: NVIDIA's data sheets. Names are matched
# exactly: "NVIDIA L40S" must never pick up "NVIDIA L4"'s figure. Missing GPUs: set
# perf.peak_tflops=<value from the data sheet>.
PEAK_BF16_TFLOPS: dict[str, float] = {
    "NVIDIA B200": 2250.0,
    "NVIDIA H200": 989.0,
    "NVIDIA H200 NVL": 835.0,
    "NVIDIA GH200 480GB": 989.0,
    "NVIDIA H100 80GB HBM3": 989.0,  # H100 SXM
    "NVIDIA H100 PCIe": 756.0,
    "NVIDIA H100 NVL": 835.0,
    "NVIDIA A100-SXM4-40GB": 312.0,
    "NVIDIA A100-SXM4-80GB": 312.0,
    "NVIDIA A100-PCIE-40GB": 312.0,
    "NVIDIA A100 80GB PCIe": 312.0,
    "NVIDIA L40S": 362.0,
    "NVIDIA L40": 181.0,
    "NVIDIA L4": 121.0,
    "NVIDIA A10": 125.0,
    "NVIDIA RTX A6000": 155.0,
}

# On CPUs with bf16 units, bf16 autocast wins once the matrices are large enough for the
# matmul speed-up to outweigh the casts. With AMX tiles (amx_bf16: Sapphire Rapids and later)
# benchmarks/precision.py measured bf16 faster from 64 wide (1.09x; a disturbed 0.94x at 192
# read 1.49x and 1.65x on reruns) and 1.34-1.42x at 128 (2026-12-03, an AMX Xeon,
# benchmarks/README.md), so from 128. With avx512_bf16 alone (Cooper Lake, Zen 4: bf16 dot
# products, no tiles) the gain is smaller and has not been measured here: 512 stays there, an
# estimate, until someone runs the script on one. /proc/cpuinfo exists on Linux only; elsewhere
# `auto` picks 32-true on CPU (force bf16-mixed with trainer.precision=bf16-mixed).
CPU_AMX_BF16_MIN_WIDTH = 128
CPU_BF16_MIN_WIDTH = 512

BF16_TRUE_WARNING = (
    "trainer.precision=bf16-true keeps the weights themselves in bf16, with no fp32 master "
    "copy: an update smaller than about 1/256 of a weight rounds away (a weight at 1.0 stays "
    "1.0 through 100 AdamW steps of lr 1e-3, where fp32 reaches 0.90), so training stalls or "
    "drifts. Train with bf16-mixed; bf16-true suits evaluation, or memory-bound fine-tuning "
    "where you have checked the loss still falls."
)


def peak_tflops(device_name: str) -> float | None:
    """The GPU's dense bf16 peak in TFLOP/s, or None when the exact name is not in the table."""
    return PEAK_BF16_TFLOPS.get(device_name.strip())


def gpu_has_bf16() -> bool:
    """Whether the current GPU has bf16 units (emulated bf16 does not count).

    torch.cuda.is_bf16_supported() counts emulation by default, so a GPU without bf16 units
    (a V100, a T4) says True and would get the slow emulated path.
    """
    try:
        return bool(torch.cuda.is_bf16_supported(including_emulation=False))
    except TypeError:  # torch without the argument: it did not count emulation then
        return bool(torch.cuda.is_bf16_supported())


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    return {f for line in text.splitlines() if line.startswith("flags") for f in line.split()}


def cpu_bf16_units() -> str | None:
    """'amx' (bf16 matrix tiles), 'avx512' (bf16 dot products only) or None (emulated)."""
    flags = _cpu_flags()
    if "amx_bf16" in flags:
        return "amx"
    return "avx512" if "avx512_bf16" in flags else None


def cpu_bf16_min_width() -> int | None:
    """The width from which `auto` picks bf16-mixed on this CPU; None: never (emulated)."""
    units = cpu_bf16_units()
    return {"amx": CPU_AMX_BF16_MIN_WIDTH, "avx512": CPU_BF16_MIN_WIDTH}.get(units or "")


def resolve_precision(precision: object, accelerator: str, n_embd: int) -> str:
    """`auto` -> the fastest precision for this device and model width (documented rule)."""
    if str(precision) != "auto":
        return str(precision)
    if accelerator == "gpu":
        return "bf16-mixed" if gpu_has_bf16() else "16-mixed"
    min_width = cpu_bf16_min_width()
    return "bf16-mixed" if min_width is not None and n_embd >= min_width else "32-true"


def precision_warning(precision: str) -> str | None:
    """A warning for a precision that trains worse than its name suggests, else None."""
    return BF16_TRUE_WARNING if precision in ("bf16-true", "bf16") else None


def enable_tf32(accelerator: str) -> bool:
    """Let fp32 matmuls use TF32 tensor cores on CUDA (a 10-bit mantissa; returns True if set).

    Only fp32 paths change (32-true, and the fp32 parts of mixed precision): on Ampere and
    newer GPUs they run several times faster, at the precision mixed-precision training
    accepts anyway. CPUs are left alone (no TF32 there).
    """
    if accelerator != "gpu" or not torch.cuda.is_available():
        return False
    torch.set_float32_matmul_precision("high")
    return True
