"""Ablation sweep of one config field over runs that share the earlier stages (e.g. HFD's η).

    python launch/sweep.py --config configs/hfd.py:tiny --workdir runs/eta \\
        --field decoder.schedule.eta --values 0.5 1 2 --steps 2 4 8 [--data DIR] \\
        [--set KEY=VALUE ...]

Trains the stages before the swept one once (WORKDIR/shared/stage1), then the swept stage once
per value (WORKDIR/<field>=<value>/stage2), each starting from the shared model; every run
resumes where it stopped. Each model is then evaluated from real files on the evaluation images
(`config.eval_data`, or --data) at every sampler step count, together with the shared stage's
own model. Writes WORKDIR/sweep.json, sweep.md (one table: bpp, PSNR, LPIPS, DISTS per value
and step count) and sweep.png (the same as curves).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

METRICS = ("psnr", "lpips", "dists")


def _value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _set(config, key: str, value) -> None:
    *parents, leaf = key.split(".")
    node = config
    for p in parents:
        node = node[p]
    if leaf not in node:
        raise KeyError(f"config has no field {key!r}")
    node[leaf] = value


def _stop_if_preempted(summaries: list[dict]) -> None:
    """A preempted run (SIGTERM) ends the sweep; the same command resumes it."""
    if summaries and summaries[-1].get("preempted"):
        raise SystemExit("sweep stopped on SIGTERM; the same command resumes it")


def train(args) -> tuple[Path, dict[str, Path]]:
    """The shared earlier stages, then the swept stage per value; returns the models."""
    from jaxcodec.configlib import load_config
    from jaxcodec.train import train_stages

    base = load_config(args.config, [f"--config.{s}" for s in args.set])
    stages = tuple(base.stages) or (int(base.stage),)
    swept = stages[-1]
    workdir = Path(args.workdir)
    shared = workdir / "shared"
    if len(stages) > 1:
        first = load_config(args.config, [f"--config.{s}" for s in args.set])
        first.stages = stages[:-1]
        _stop_if_preempted(train_stages(first, shared))
    models = {}
    for v in args.values:
        cfg = load_config(args.config, [f"--config.{s}" for s in args.set])
        cfg.stages = (swept,)
        if len(stages) > 1:
            cfg.init_from = str((shared / f"stage{stages[-2]}").absolute())
        _set(cfg, args.field, _value(v))
        run = workdir / f"{args.field}={v}"
        _stop_if_preempted(train_stages(cfg, run))
        models[v] = run / f"stage{swept}"
    return shared / f"stage{stages[-2]}" if len(stages) > 1 else None, models


def evaluate(args, previous: Path | None, models: dict[str, Path]) -> list[dict]:
    from jaxcodec.codec import load_codec
    from jaxcodec.configlib import load_config
    from jaxcodec.evaluate import MetricSuite, evaluate_point, load_images

    if args.data:
        images = load_images(args.data, limit=args.limit)
    else:
        from jaxcodec.data import load_eval_images

        config = load_config(args.config, [f"--config.{s}" for s in args.set])
        images = load_eval_images(config.eval_data, max_images=args.limit)
    suite = MetricSuite(list(METRICS))
    rows = []
    if previous is not None:
        point = evaluate_point(load_codec(previous), images, suite, warmup=1, progress=False)
        rows.append({"value": "previous stage", "steps": None} | _means(point))
    for v, model in models.items():
        for steps in args.steps:
            codec = load_codec(model, options={"steps": steps})
            point = evaluate_point(codec, images, suite, warmup=1, progress=False)
            rows.append({"value": v, "steps": steps} | _means(point))
            print(f"{args.field}={v} steps={steps}: " + _fmt(rows[-1]), flush=True)
    return rows


def _means(point: dict) -> dict:
    keys = ("bpp", *METRICS, "decode_time")
    return {k: float(point[k]) for k in keys if k in point}


def _fmt(row: dict) -> str:
    return ", ".join(f"{k} {row[k]:.4f}" for k in ("bpp", *METRICS) if k in row)


def write_report(args, rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(args.workdir)
    (out / "sweep.json").write_text(
        json.dumps({"field": args.field, "config": args.config, "rows": rows}, indent=2) + "\n"
    )
    header = f"| {args.field} | steps | bpp | PSNR | LPIPS | DISTS |"
    lines = [header, "|---|---|---|---|---|---|"]
    for r in rows:
        steps = "—" if r["steps"] is None else r["steps"]
        cells = " | ".join(f"{r.get(k, float('nan')):.4f}" for k in ("bpp", *METRICS))
        lines.append(f"| {r['value']} | {steps} | {cells} |")
    (out / "sweep.md").write_text("\n".join(lines) + "\n")

    fig, axes = plt.subplots(1, 1 + len(METRICS), figsize=(4.2 * (1 + len(METRICS)), 3.6))
    swept = [r for r in rows if r["steps"] is not None]
    values = list(dict.fromkeys(r["value"] for r in swept))
    x = np.arange(len(values))
    for ax, metric in zip(axes, ("bpp", *METRICS), strict=True):
        for steps in args.steps:
            ys = [next(r[metric] for r in swept if r["value"] == v and r["steps"] == steps)
                  for v in values]  # fmt: skip
            ax.plot(x, ys, "o-", label=f"{steps} steps")
        for r in rows:
            if r["steps"] is None:
                ax.axhline(r[metric], color="grey", linestyle="--", label="previous stage")
        ax.set_xticks(x, values)
        ax.set_xlabel(args.field)
        ax.set_title(metric.upper())
        ax.grid(alpha=0.3)
    axes[-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "sweep.png", dpi=110)
    plt.close(fig)
    print(f"wrote {out / 'sweep.md'}, {out / 'sweep.json'}, {out / 'sweep.png'}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True)
    p.add_argument("--workdir", required=True)
    p.add_argument("--field", required=True, help="config field, e.g. decoder.schedule.eta")
    p.add_argument("--values", nargs="+", required=True)
    p.add_argument("--steps", nargs="+", type=int, default=[4], help="sampler step counts")
    p.add_argument("--data", default=None, help="folder of evaluation images")
    p.add_argument("--limit", type=int, default=None, help="use the first N images")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args(argv)
    previous, models = train(args)
    write_report(args, evaluate(args, previous, models))


if __name__ == "__main__":
    main()
