"""Throughput of a compiled train step: FLOPs per device from XLA's cost analysis, peak
FLOP/s of common accelerators, and model FLOP utilisation (MFU).

XLA's `cost_analysis()` of an SPMD-partitioned executable describes one device's program, and
it counts the body of a `while` loop once whatever its trip count. Train steps have such
loops (the scan over gradient-accumulation micro-batches, a sampler chain trained through),
so when the optimised program still contains loops the XLA figure is scaled by the ratio of
matmul/convolution FLOPs in the step's jaxpr counted with and without the loops' trip counts.
Rematerialised forward passes are executed work and are counted (strictly, the utilisation is
then "hardware" rather than "model" FLOPs utilisation).
"""

from __future__ import annotations

import math
from typing import Any

import jax.extend.core as jex_core

# Dense bf16 peak TFLOP/s per JAX device (a TPU v2/v3 device is one core, half a chip; later
# TPUs and GPUs are one chip per device). Matched against `device_kind`, longest key first.
PEAK_TFLOPS: dict[str, float] = {
    "TPU v2": 22.5,
    "TPU v3": 61.5,
    "TPU v4": 275.0,
    "TPU v5 lite": 197.0,  # v5e
    "TPU v5e": 197.0,
    "TPU v5p": 459.0,
    "TPU v5": 459.0,  # v5p reports "TPU v5"
    "TPU v6 lite": 918.0,  # v6e (Trillium)
    "TPU v6e": 918.0,
    "A100": 312.0,
    "H100 PCIe": 756.0,
    "H100": 989.0,  # SXM
    "H200": 989.0,
    "B200": 2250.0,
    "L4": 121.0,
    "MI300X": 1307.0,
}


def peak_tflops(device_kind: str, override: float | None = None) -> float | None:
    """The configured peak (if > 0), else the built-in one for `device_kind`, else None."""
    if override:
        return float(override)
    for key in sorted(PEAK_TFLOPS, key=len, reverse=True):
        if key.lower() in device_kind.lower():
            return PEAK_TFLOPS[key]
    return None


def compiled_flops(compiled) -> float | None:
    """FLOPs of one device's program in XLA's cost analysis (None if XLA gives none)."""
    try:
        cost = compiled.cost_analysis()
    except Exception:  # some backends do not implement it
        return None
    if isinstance(cost, list | tuple):
        cost = cost[0] if cost else {}
    flops = float((cost or {}).get("flops", 0.0))
    return flops if flops > 0 else None


def _prod(xs) -> int:
    return math.prod(int(x) for x in xs)


def _eqn_flops(eqn) -> float:
    name = eqn.primitive.name
    if name == "dot_general":
        lhs = eqn.invars[0].aval
        (contract, _), _ = eqn.params["dimension_numbers"]
        return 2.0 * _prod(eqn.outvars[0].aval.shape) * _prod(lhs.shape[d] for d in contract)
    if name == "conv_general_dilated":
        rhs = eqn.invars[1].aval
        out_feature_dim = eqn.params["dimension_numbers"].rhs_spec[0]
        per_output = _prod(rhs.shape) / max(int(rhs.shape[out_feature_dim]), 1)
        return 2.0 * _prod(eqn.outvars[0].aval.shape) * per_output
    return 0.0


def _sub_jaxprs(value) -> list:
    if isinstance(value, jex_core.ClosedJaxpr):
        return [value.jaxpr]
    if isinstance(value, jex_core.Jaxpr):
        return [value]
    if isinstance(value, list | tuple):
        return [j for v in value for j in _sub_jaxprs(v)]
    return []


def jaxpr_matmul_flops(jaxpr, *, trip_counts: bool = True) -> float:
    """Matmul and convolution FLOPs of a jaxpr, sub-jaxprs included; `scan` bodies times their
    length (or once, `trip_counts=False`, as XLA's cost analysis counts loops); the costliest
    branch of a `cond`; `while` bodies once (their trip count is not static)."""
    if isinstance(jaxpr, jex_core.ClosedJaxpr):
        jaxpr = jaxpr.jaxpr
    total = 0.0
    for eqn in jaxpr.eqns:
        total += _eqn_flops(eqn)
        name = eqn.primitive.name
        if name == "cond":
            branches = eqn.params["branches"]
            total += max(
                (jaxpr_matmul_flops(b, trip_counts=trip_counts) for b in branches), default=0.0
            )
            continue
        inner = sum(
            jaxpr_matmul_flops(j, trip_counts=trip_counts)
            for v in eqn.params.values()
            for j in _sub_jaxprs(v)
        )
        if name == "scan" and trip_counts:
            inner *= int(eqn.params["length"])
        total += inner
    return total


def step_flops(compiled, jaxpr=None) -> float | None:
    """FLOPs per device of one execution of `compiled`: XLA's cost analysis, scaled for loop
    trip counts (from `jaxpr`, the traced step) when the optimised program still has loops."""
    flops = compiled_flops(compiled)
    if flops is None or jaxpr is None:
        return flops
    try:
        has_loops = " while(" in compiled.as_text()
    except Exception:
        has_loops = True
    if not has_loops:
        return flops
    once = jaxpr_matmul_flops(jaxpr, trip_counts=False)
    full = jaxpr_matmul_flops(jaxpr, trip_counts=True)
    return flops * (full / once) if once > 0 else flops


def memory_stats(compiled) -> dict[str, int] | None:
    """Per-device bytes of XLA's memory analysis: arguments, outputs, temporaries, aliased
    (donated) buffers, generated code; `peak` = arguments + outputs + temporaries − aliased."""
    try:
        m = compiled.memory_analysis()
    except Exception:
        return None
    if m is None:
        return None
    out = {
        "arguments": int(m.argument_size_in_bytes),
        "outputs": int(m.output_size_in_bytes),
        "temporaries": int(m.temp_size_in_bytes),
        "aliased": int(m.alias_size_in_bytes),
        "code": int(m.generated_code_size_in_bytes),
    }
    out["peak"] = out["arguments"] + out["outputs"] + out["temporaries"] - out["aliased"]
    return out


class Throughput:
    """Examples/s, TFLOP/s per device and MFU from steps/s and the compiled step's cost."""

    def __init__(self, batch_size: int, flops_per_step: float | None, peak: float | None):
        self.batch_size = batch_size
        self.flops_per_step = flops_per_step  # per device
        self.peak = peak  # TFLOP/s per device

    def at(self, steps_per_sec: float) -> dict[str, float]:
        out = {"examples_per_sec": steps_per_sec * self.batch_size}
        if self.flops_per_step:
            tflops = steps_per_sec * self.flops_per_step / 1e12
            out["tflops_per_device"] = tflops
            if self.peak:
                out["mfu"] = tflops / self.peak
        return out

    @staticmethod
    def format(values: dict[str, float]) -> str:
        parts = [f"{values['examples_per_sec']:.3g} ex/s"]
        if "tflops_per_device" in values:
            parts.append(f"{values['tflops_per_device']:.3g} TFLOP/s/dev")
        if "mfu" in values:
            parts.append(f"MFU {100 * values['mfu']:.2f}%")
        return "  ".join(parts)

    def describe(self) -> dict[str, Any]:
        return {
            "flops_per_step_per_device": self.flops_per_step,
            "peak_tflops_per_device": self.peak,
        }
