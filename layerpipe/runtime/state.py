"""State: a pipeline's parameters, buffers and optimizer state, read and written independently of its layout.

Names are those of ``nn.Sequential(*layers)`` (``"3.weight"``), so what one
layout saves loads into another: every process passes the same values and
each keeps what its stages and shards store.  The functions below are the
serialisation half of a ``StageShard`` (the flat and sharded buffers to and
from full values by name); ``PipelineState`` applies them to a rank's stages.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from .p2p import wait_for
from .sharding import StageShard, all_gather_into
from .stage import Stage
from .ties import check_tied_values, expand_aliases


class PipelineState:
    """The state of this process's ``stages`` with their ``shards`` and ``optimizers`` (by stage index)."""

    def __init__(
        self,
        stages: dict[int, Stage],
        shards: dict[int, StageShard],
        optimizers: dict[int, torch.optim.Optimizer],
        timeout: float,
        rank: int,
        tied: tuple = (),
    ):
        self.stages, self.shards, self.optimizers = stages, shards, optimizers
        self.timeout, self.rank = timeout, rank
        self.tied = tied  # parameters tied across stages (``runtime.ties``): stored once, loaded into every holder

    def named_parameters(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield this process's parameters by model name (at ZeRO-3 the part this replica stores)."""
        for index in sorted(self.shards):
            yield from self.shards[index].local_parameters()

    def gathered_state_dict(self) -> dict[str, torch.Tensor]:
        """Return copies of the stages' full parameters and buffers by model name (collective at ZeRO-3)."""
        state = {}
        for index in sorted(self.stages):
            stage = self.stages[index]
            full = full_parameters(self.shards[index], self.timeout, self.rank)
            stored = stage.stored_names()  # every name of a shared parameter gets its one stored value
            for offset, layer in enumerate(stage.layers):
                prefix = f"{stage.first + offset}."
                for name, tensor in layer.named_buffers():
                    state[prefix + name] = tensor.detach().clone()
                for name, parameter in layer.named_parameters(remove_duplicate=False):
                    state[prefix + name] = full.get(stored[prefix + name], parameter.detach())
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load full parameter and buffer values by model name; ``KeyError`` names one the stages need and lack.

        A tied parameter given under its first name only loads into every holder; given under two names with
        different values it is refused (``ValueError``, ``check_tied_values``)."""
        check_tied_values(state, self.tied)
        state = expand_aliases(state, self.tied)
        for index in sorted(self.stages):
            stage, shard = self.stages[index], self.shards[index]
            missing = [name for name in shard.names if name not in state]
            if missing:
                raise KeyError(f"the state has no value for {missing[0]} (stage {index})")
            check_shared_values(stage, state)
            load_parameters(shard, {name: state[name] for name in shard.names})
            with torch.no_grad():
                for offset, layer in enumerate(stage.layers):
                    for name, tensor in layer.named_buffers():
                        key = f"{stage.first + offset}.{name}"
                        if key in state:
                            tensor.copy_(state[key])

    def optimizer_state_dict(self) -> dict:
        """Return the optimizers' state and hyperparameters per parameter name (collective at ZeRO 1–3)."""
        state, hyperparameters = {}, {}
        for index, optimizer in sorted(self.optimizers.items()):
            shard = self.shards[index]
            state.update(full_optimizer_state(shard, optimizer, self.timeout, self.rank))
            group = {key: value for key, value in optimizer.param_groups[0].items() if key != "params"}
            hyperparameters.update({name: dict(group) for name in shard.names})
        return {"state": state, "hyperparameters": hyperparameters}

    def load_optimizer_state_dict(self, state: dict) -> None:
        """Load what ``optimizer_state_dict`` returned (on this or another layout) into the optimizers."""
        values = expand_aliases(state["state"], self.tied)
        for index, optimizer in sorted(self.optimizers.items()):
            shard = self.shards[index]
            load_optimizer_state(shard, optimizer, values)
            options = state.get("hyperparameters", {}).get(shard.names[0]) if shard.names else None
            for group in optimizer.param_groups:
                group.update({key: value for key, value in (options or {}).items() if key in group})


def full_parameters(shard: StageShard, timeout: float, rank: int) -> dict[str, torch.Tensor]:
    """Return copies of the stage's full parameters by model name (collective at ZeRO-3 when released).

    ``timeout`` bounds the gather; ``rank`` names this process in its error.
    """
    released = not shard.gathered
    if released:
        wait_for(shard.gather(), timeout, rank, f"gathering stage {shard.stage_index}'s weights for a state dict")
    values = {name: p.detach().clone() for name, p in zip(shard.names, shard.parameters)}
    if released:
        shard.release()
    return values


def check_shared_values(stage: Stage, state: dict[str, torch.Tensor]) -> None:
    """Refuse, with ``ValueError`` naming both, a state giving two names of one shared parameter different values
    (the parameter is loaded from its first name)."""
    for name, first in stage.stored_names().items():
        if name != first and name in state and first in state and not torch.equal(state[name], state[first]):
            raise ValueError(
                f"the state gives {first} and {name}, one parameter shared by layers of stage {stage.index}, "
                f"different values: give both names one value"
            )


def load_parameters(shard: StageShard, values: dict[str, torch.Tensor]) -> None:
    """Copy full parameter values (by model name) into the stage's buffers: the flat buffer, or the shard at ZeRO-3.

    Every replica must pass the same values; each keeps what it stores.
    """
    with torch.no_grad():
        if shard.zero == 3:
            full = _flatten(shard, values)
            shard.shard.copy_(full[shard.shard_bounds[0] : shard.shard_bounds[1]])
            return
        for name, parameter in zip(shard.names, shard.parameters):
            parameter.copy_(values[name])


def full_optimizer_state(
    shard: StageShard, optimizer: torch.optim.Optimizer, timeout: float, rank: int
) -> dict[str, dict]:
    """Return the optimizer's state per parameter, by model name: ``{name: {key: tensor shaped like it}}``.

    At ZeRO 1–3 the optimizer steps the flat shard: its per-element state
    is gathered from the replicas (collective over the data-parallel
    group) and cut into the parameters; a scalar state (``step``) is given
    to every parameter.  Independent of the layout, so it loads into another.
    """
    if shard.zero == 0:
        return {
            name: {
                key: value.detach().clone()
                for key, value in optimizer.state.get(p, {}).items()
                if isinstance(value, torch.Tensor)
            }
            for name, p in zip(shard.names, shard.parameters)
        }
    state = optimizer.state.get(shard.shard, {})
    found: dict[str, dict] = {name: {} for name in shard.names}
    for key, value in sorted(state.items()):
        if not isinstance(value, torch.Tensor):
            continue
        if value.dim() == 0:  # a count, as Adam's step
            for name in shard.names:
                found[name][key] = value.detach().clone()
            continue
        full = torch.empty(shard.shard_size * shard.replicas, dtype=value.dtype, device=value.device)
        wait_for(
            all_gather_into(full, value.detach().contiguous(), shard.group),
            timeout,
            rank,
            f"gathering stage {shard.stage_index}'s optimizer state {key!r} for a checkpoint",
        )
        for name, parameter, (start, end) in zip(shard.names, shard.parameters, shard.spans):
            found[name][key] = full[start:end].view(parameter.shape).clone()
    return found


def load_optimizer_state(shard: StageShard, optimizer: torch.optim.Optimizer, state: dict[str, dict]) -> None:
    """Set the optimizer's state from ``full_optimizer_state``'s form (every replica passes the same)."""
    if shard.zero == 0:
        for name, parameter in zip(shard.names, shard.parameters):
            optimizer.state[parameter] = {key: value.clone() for key, value in state.get(name, {}).items()}
        return
    low, high = shard.shard_bounds
    keys = sorted({key for values in state.values() for key in values})
    loaded = {}
    for key in keys:
        pieces = {name: state[name][key] for name in shard.names if key in state.get(name, {})}
        first = next(iter(pieces.values()))
        if first.dim() == 0:
            loaded[key] = first.clone()
        else:
            loaded[key] = _flatten(shard, pieces)[low:high].clone()
    optimizer.state[shard.shard] = loaded


def _flatten(shard: StageShard, values: dict[str, torch.Tensor]) -> torch.Tensor:
    """Return per-parameter values laid out as the padded flat buffer (zeros in the padding)."""
    sample = next(iter(values.values()))
    full = torch.zeros(shard.shard_size * shard.replicas, dtype=sample.dtype, device=shard.flat.device)
    for name, (start, end) in zip(shard.names, shard.spans):
        if name in values:
            full[start:end].copy_(values[name].reshape(-1))
    return full
