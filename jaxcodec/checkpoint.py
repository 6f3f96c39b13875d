"""Checkpoints: train state, data-iterator position and extra items, via one orbax manager.

Orbax writes each step to a temporary directory and renames it when complete, so a run
killed mid-write leaves the previous checkpoint intact; restoring takes the target shardings
of the current mesh, so a run may resume on a different number of devices.
"""

from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

STATE = "state"
DATA = "data_iterator"
ENTROPY_TABLES = "entropy_tables"


class Checkpointer:
    """Keeps the last `max_to_keep` checkpoints of a workdir's `checkpoints/` folder."""

    def __init__(self, workdir: str | Path, *, max_to_keep: int = 3, async_save: bool = True):
        self.directory = Path(workdir).absolute() / "checkpoints"
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            create=True,
            enable_async_checkpointing=async_save,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(
        self,
        step: int,
        state: Any,
        data_state: dict | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        """Saves the state, the data iterator's position and optional extra pytrees of host
        arrays (e.g. the integer entropy-coding tables built after training)."""
        items = {STATE: ocp.args.StandardSave(state)}
        if data_state is not None:
            items[DATA] = ocp.args.JsonSave(data_state)
        for name, value in (extra or {}).items():
            items[name] = ocp.args.StandardSave(value)
        self.manager.save(step, args=ocp.args.Composite(**items), force=True)

    def restore(
        self, step: int, abstract_state: Any, *, with_data: bool = True
    ) -> tuple[Any, dict | None]:
        """Restores onto the shardings carried by `abstract_state` (ShapeDtypeStructs)."""
        items = {STATE: ocp.args.StandardRestore(abstract_state)}
        present = self.item_names(step)
        if with_data and DATA in present:
            items[DATA] = ocp.args.JsonRestore()
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        return restored[STATE], (restored[DATA] if DATA in items else None)

    def restore_item(self, step: int, name: str) -> dict:
        """One JSON item of a checkpoint."""
        return self.manager.restore(
            step, args=ocp.args.Composite(**{name: ocp.args.JsonRestore()})
        )[name]

    def item_names(self, step: int) -> set[str]:
        return {p.name for p in (self.directory / str(step)).iterdir() if p.is_dir()}

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def abstract_like(tree: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs of `tree` carrying the given shardings, as restore targets."""
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
    )
