"""Parameters tied across stages: found by identity, kept as one copy per holding stage, summed by ``TIE``.

One ``nn.Parameter`` held by layers of several stages (a language model's
embedding and head) is a tied parameter; the stages holding it are its
holders.  Every holder keeps a copy of its own (a rank holding several
holders gives each of them its own ``nn.Parameter``: each stage's flat
buffer holds its copy).  Once per step the ``TIE`` action of the program
sums the copies' gradients over the holders — locally where one rank holds
them all (the V-shape's first and last stage), else with one all-reduce over
the holding ranks of this replica — so every copy gets the gradient the one
parameter has in one process, and steps alike from equal optimizer state.
The data-parallel reduce of the holders follows the sum (the program puts
it there), so each ZeRO shard ends with the summed gradient of its part.
The global gradient norm counts each tied parameter once: on its first
holder (``uncounted_names``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from ..schedule.actions import Action
from ..schedule.ties import Ties, merge_ties
from .p2p import wait_for
from .run_state import COMPUTE


@dataclass(frozen=True)
class TiedParameter:
    """One parameter tied across stages: its first name in the model and, per holding stage, its name there."""

    name: str
    names: dict[int, str]  # holding stage -> the parameter's first name among that stage's layers
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def stages(self) -> tuple[int, ...]:
        """Return the holding stages, lowest first."""
        return tuple(sorted(self.names))


def find_tied(layers, boundaries) -> tuple[TiedParameter, ...]:
    """Return the trainable parameters held by layers of more than one stage, in the order their first names come."""
    found: dict[int, dict[int, str]] = {}
    shapes: dict[int, tuple] = {}
    for stage, (first, end) in enumerate(boundaries):
        for index in range(first, end):
            for name, parameter in layers[index].named_parameters(remove_duplicate=False):
                if not parameter.requires_grad:  # a frozen copy never changes: nothing to sum
                    continue
                found.setdefault(id(parameter), {}).setdefault(stage, f"{index}.{name}")
                shapes[id(parameter)] = (tuple(parameter.shape), parameter.dtype)
    return tuple(
        TiedParameter(names[min(names)], names, *shapes[key]) for key, names in found.items() if len(names) > 1
    )


def tie_groups(tied: tuple[TiedParameter, ...]) -> Ties:
    """Return the tie groups of ``tied``: the holding stages of each, overlapping sets merged."""
    return merge_ties(parameter.stages for parameter in tied)


def uncounted_names(tied: tuple[TiedParameter, ...], stage: int) -> set[str]:
    """Return the names of ``stage``'s copies of tied parameters that the global norm counts on another holder."""
    return {parameter.names[stage] for parameter in tied if stage in parameter.names and stage != parameter.stages[0]}


def aliases(tied: tuple[TiedParameter, ...]) -> dict[str, str]:
    """Return, for every holder's name of a tied parameter but the first, the first name (stored once under it)."""
    return {name: parameter.name for parameter in tied for name in parameter.names.values() if name != parameter.name}


def expand_aliases(values: dict, tied: tuple[TiedParameter, ...]) -> dict:
    """Return ``values`` (by name) with every holder's name of a tied parameter given the first name's value where
    it has none of its own (what is stored once loads into every holder)."""
    found = dict(values)
    for alias, first in aliases(tied).items():
        if alias not in found and first in found:
            found[alias] = found[first]
    return found


def check_tied_values(state: dict, tied: tuple[TiedParameter, ...]) -> None:
    """Refuse, with ``ValueError`` in one line naming both, a state giving two holders' names of one tied parameter
    different values (its copies must start equal to stay equal)."""
    for parameter in tied:
        given = [name for name in parameter.names.values() if name in state]
        for name in given[1:]:
            if not torch.equal(state[name], state[given[0]]):
                raise ValueError(
                    f"the state gives {given[0]} and {name}, one parameter tied across stages "
                    f"{', '.join(map(str, parameter.stages))}, different values: give both names one value"
                )


def untie_local(stages: dict, tied: tuple[TiedParameter, ...]) -> None:
    """Give each local holder of a tied parameter after the first its own ``nn.Parameter`` (an equal copy), so
    that each stage's flat buffer holds its own copy even where one process holds several holders."""
    for parameter in tied:
        local = [stage for stage in parameter.stages if stage in stages]
        if len(local) < 2:
            continue
        shared = dict(stages[local[0]].named_model_parameters())[parameter.names[local[0]]]
        for stage in local[1:]:
            copy = nn.Parameter(shared.detach().clone(), requires_grad=shared.requires_grad)
            for module in stages[stage].modules():
                for key, value in list(module._parameters.items()):
                    if value is shared:
                        module._parameters[key] = copy


class LocalTies:
    """What this process sums at each ``TIE``: per tie group, its tied parameters' local copies and the group of
    this replica's holding ranks (``None`` where this rank holds the whole group)."""

    def __init__(self, tied, groups: Ties, shards: dict, layout, global_rank: int, placement):
        self.tied, self.groups = tied, {group[0]: group for group in groups}
        self.shards = shards
        self.process_groups = _make_groups(groups, layout, global_rank, placement)

    def copies(self, parameter: TiedParameter) -> list[torch.Tensor]:
        """Return the gradients of this process's copies of ``parameter`` (views of their stages' flat buffers)."""
        found = []
        for stage, name in parameter.names.items():
            shard = self.shards.get(stage)
            if shard is not None:
                found.append(shard.parameters[shard.names.index(name)].grad)
        return found

    def sum(self, first_stage: int, timeout: float, rank: int, action: Action) -> None:
        """Sum the gradients of tie group ``first_stage``'s parameters over their holders, into every local copy."""
        group = set(self.groups[first_stage])
        members = [parameter for parameter in self.tied if set(parameter.stages) <= group]
        local = [self.copies(parameter) for parameter in members]
        sample = next(grad for grads in local for grad in grads)
        totals = [
            torch.stack(grads).sum(0) if grads else sample.new_zeros(parameter.shape)
            for grads, parameter in zip(local, members)
        ]
        process_group = self.process_groups.get(first_stage)
        if process_group is not None:
            flat = torch.cat([total.reshape(-1) for total in totals])
            wait_for(
                dist.all_reduce(flat, group=process_group, async_op=True),
                timeout,
                rank,
                f"at {action} summing tied gradients",
            )
            totals = [part.view_as(total) for part, total in zip(flat.split([t.numel() for t in totals]), totals)]
        for grads, total in zip(local, totals):
            for grad in grads:
                grad.copy_(total)


def _make_groups(groups: Ties, layout, global_rank: int, placement) -> dict:
    """Return, per tie group spanning several ranks, this process's group of the replica's holding ranks.

    Every process creates every such group, in one order (``new_group`` is collective over the world).
    """
    mine = {}
    for group in groups:
        ranks = sorted({placement.rank_of(stage) for stage in group})
        if len(ranks) < 2:
            continue
        for replica in range(layout.data_parallel):
            for band in range(layout.spatial):
                members = [layout.global_rank(rank, replica, band) for rank in ranks]
                made = dist.new_group(members)
                if global_rank in members:
                    mine[group[0]] = made
    return mine


def sum_ties(executor, action: Action, state) -> str:
    """The ``TIE`` handler: sum the tie group's gradients over its holders (see ``LocalTies.sum``)."""
    context = executor.context
    executor.ties.sum(action.stage, context.timeout, context.rank, action)
    return COMPUTE
