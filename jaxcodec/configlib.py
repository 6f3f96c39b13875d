"""Loading configs the way the command line does, for scripts, tests and the CLI."""

from collections.abc import Sequence
from pathlib import Path

import ml_collections
from absl import flags
from ml_collections import config_flags

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def load_config(spec: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
    """`spec` is `path/to/file.py[:variant]`; overrides are `--config.a.b=value` strings (or the
    same without the leading `--config.`), parsed exactly as `python -m jaxcodec.train` does."""
    path, _, variant = spec.partition(":")
    if not Path(path).exists() and (PROJECT_ROOT / path).exists():
        path = str(PROJECT_ROOT / path)
    if not Path(path).exists():
        raise FileNotFoundError(f"config file {path!r} not found")
    argv = ["load_config", f"--config={path}{':' + variant if variant else ''}"]
    for o in overrides:
        argv.append(o if o.startswith("--") else f"--config.{o}")
    fv = flags.FlagValues()
    # Override flags are declared from the argv the config flag is told about.
    config_flags.DEFINE_config_file("config", default=None, flag_values=fv, sys_argv=argv)
    fv(argv)
    return fv.config


def stage_config(config: ml_collections.ConfigDict, stage: int) -> ml_collections.ConfigDict:
    """The config one stage trains with: a copy with `stage` set and the fields of the
    `stage<N>` block (if any) laid over the top level, recursively."""
    out = ml_collections.ConfigDict(config.to_dict())
    out.stage = int(stage)
    block = config.get(f"stage{stage}")
    if block is not None:
        _overlay(out, block.to_dict())
    return out


def _overlay(config: ml_collections.ConfigDict, fields: dict) -> None:
    for key, value in fields.items():
        if isinstance(value, dict) and isinstance(config.get(key), ml_collections.ConfigDict):
            _overlay(config[key], value)
        else:
            config[key] = value


def load_workdir_config(workdir: str | Path) -> ml_collections.ConfigDict:
    """The resolved config a training run wrote into its workdir."""
    path = Path(workdir) / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{workdir} has no config.json: is it a jaxcodec training workdir?")
    return ml_collections.ConfigDict(_json_load(path))


def _json_load(path: Path) -> dict:
    import json

    return json.loads(path.read_text())
