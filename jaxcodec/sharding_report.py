"""`jaxcodec shardings` (`python -m jaxcodec.sharding_report`): every parameter's logical axes,
mesh partitioning and bytes per device, for the train state and the frozen parts, from shapes
only (`jax.eval_shape`: nothing is allocated, so full-size configs report on a laptop).
"""

from collections.abc import Sequence

import jax

from jaxcodec import train_shapes
from jaxcodec.sharding import (
    DEFAULT_FSDP_MIN_BYTES,
    create_mesh,
    format_bytes,
    format_placements,
    placements,
    rules_of,
)


def add_report_arguments(p) -> None:
    p.add_argument("--config", required=True, help="e.g. configs/rdeic.py:full,stage=2")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE")
    p.add_argument("--mesh", default=None, help="mesh shape, e.g. 1,8,1 (default: the config's)")
    p.add_argument(
        "--devices",
        type=int,
        default=0,
        help="fake this many CPU devices (before JAX starts; default: the real devices)",
    )
    p.add_argument("--top", type=int, default=40, help="largest arrays listed per part (0: all)")


def report(args) -> str:
    """Every parameter's logical axes, mesh partitioning and bytes per device, for the train
    state (params, optimiser state, EMA, model state) and the frozen parts, from shapes only."""
    from jaxcodec.configlib import load_config

    overrides = list(args.overrides)
    if args.mesh:
        overrides.append(f"mesh.shape=({args.mesh.strip('()')},)")
    config = load_config(args.config, overrides)
    shapes = train_shapes.model_shapes(config)
    mesh = create_mesh(config.mesh.shape, config.mesh.axes, train_shapes.mesh_devices(config))
    try:
        abstract_frozen = shapes.method.abstract_frozen()
    except (ValueError, FileNotFoundError) as exc:
        abstract_frozen, frozen_note = None, f"frozen parts: not known from the config ({exc})"
    else:
        frozen_note = "frozen parts: none, or placed from their arrays when loaded (the size-"
        frozen_note += "gated fsdp fallback applies)"
    state_sh, frozen_sh = train_shapes.shardings(config, mesh, shapes)
    state = shapes.abstract_state
    top = args.top or None
    parts = [
        f"{args.config}: mesh {dict(mesh.shape)} over {mesh.devices.size} "
        f"{mesh.devices.flat[0].platform} devices; fsdp fallback from "
        f"{config.mesh.get('fsdp_min_bytes', DEFAULT_FSDP_MIN_BYTES)} bytes",
        "rules: " + ", ".join(f"{n}→{a}" for n, a in rules_of(config)),
        "columns: path, shape, logical axes, mesh partitioning, bytes per device / whole",
        format_placements(
            "trainable parameters", placements(state.params, state_sh.params), top=top
        ),
    ]
    totals = {}
    for name, tree, sh in (
        ("params", state.params, state_sh.params),
        ("optimiser state", state.opt_state, state_sh.opt_state),
        ("EMA parameters", state.ema_params, state_sh.ema_params),
        ("model state", state.model_state, state_sh.model_state),
    ):
        rows = placements(tree, sh)
        totals[name] = (sum(r.bytes for r in rows), sum(r.bytes_per_device for r in rows))
    if state.model_state:
        parts.append(
            format_placements(
                "model state", placements(state.model_state, state_sh.model_state), top=top
            )
        )
    if abstract_frozen is not None:
        rows = placements(abstract_frozen, frozen_sh)
        parts.append(format_placements("frozen parts", rows, top=top))
        totals["frozen"] = (sum(r.bytes for r in rows), sum(r.bytes_per_device for r in rows))
    else:
        parts.append(frozen_note)
    lines = ["bytes per device (whole):"]
    for name, (whole, per_dev) in totals.items():
        lines.append(f"  {name:<16} {format_bytes(per_dev):>11}  ({format_bytes(whole)})")
    all_dev = sum(v[1] for v in totals.values())
    lines.append(f"  {'total':<16} {format_bytes(all_dev):>11}  (activations not included)")
    parts.append("\n".join(lines))
    return "\n\n".join(parts)


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(
        prog="jaxcodec shardings", description="Sharding and bytes per device of every parameter"
    )
    add_report_arguments(p)
    return print_report(p.parse_args(argv))


def print_report(args) -> int:
    if args.devices:  # fake CPU devices: only before JAX has started a backend
        jax.config.update("jax_platforms", "cpu")
        jax.config.update("jax_num_cpu_devices", args.devices)
    print(report(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
