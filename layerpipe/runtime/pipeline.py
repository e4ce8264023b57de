"""``Pipeline``: the user-facing object that splits a model into stages and runs training steps.

Every process builds the same list of layers (same seed) and the same
``Pipeline``; each keeps only the stages its rank holds.  A step splits the
batch into micro-batches, runs this rank's lowered program (the schedule's
data, see ``layerpipe.schedule``) and returns the mean loss on every rank.
"""

from __future__ import annotations

from typing import Callable, Iterator, Sequence

import torch
import torch.distributed as dist
from torch import nn

from ..schedule.build import Schedule, build_schedule, forward_programs
from ..schedule.config import ConfigError, ScheduleConfig
from ..sim.timeline import Timeline
from .executor import Executor, RunResult
from .launch import init_process_group
from .partition import partition as split_layers
from .p2p import wait_for
from .stage import Stage, as_tuple

_LOSS_TAG = (1 << 28) - 1

Tensors = torch.Tensor | Sequence[torch.Tensor]


class Pipeline:
    """A model split into ``ranks × stages_per_rank`` stages, trained with a pipeline schedule.

    ``layers``: ``list[nn.Module]`` or ``nn.Sequential``, identical on every
    process.  ``loss_fn(output, target)`` returns the mean loss over one
    micro-batch.  ``optimizer``: optional ``callable(params) -> Optimizer``,
    called once per local stage.  ``partition``: ``"parameters"`` (default),
    ``"time"`` (measured on ``sample``, a callable returning one micro-batch
    input) or the first layer index of every stage.  ``schedule`` may also
    be a built ``Schedule`` whose programs are run as they are.
    ``timeout`` bounds every wait, in seconds.

    Refuses, with ``ConfigError``, options that are not implemented in the
    runtime yet (``data_parallel > 1``, ``zero``, ``recompute``), a schedule
    whose rank count differs from the process group's, and invalid schedule
    options; with ``PartitionError``, fewer layers than stages.
    """

    def __init__(self, layers: Sequence[nn.Module] | nn.Sequential, loss_fn: Callable,
                 schedule: str | Schedule = "breadth-first", microbatches: int = 8, stages_per_rank: int = 1,
                 group_size: int | None = None, optimizer: Callable | None = None,
                 partition: str | Sequence[int] = "parameters", placement: str = "auto", data_parallel: int = 1,
                 zero: int = 0, recompute: Sequence[int] | str = (), device: torch.device | str | None = None,
                 timeout: float = 300.0, sample: Callable[[], object] | None = None):
        _refuse_later_options(data_parallel, zero, recompute)
        init_process_group(timeout)
        world = dist.get_world_size()
        if isinstance(schedule, Schedule):
            self.schedule = schedule
        else:
            config = ScheduleConfig(schedule, ranks=world, microbatches=microbatches,
                                    stages_per_rank=stages_per_rank, group_size=group_size, placement=placement)
            try:
                self.schedule = build_schedule(config)
            except ConfigError as error:
                raise ConfigError(_python_names(str(error))) from None
        if self.schedule.config.ranks != world:
            raise ConfigError(f"schedule for {self.schedule.config.ranks} ranks: the process group has {world} "
                              f"processes (start as many processes as pipeline ranks)")
        self.rank = dist.get_rank()
        self.microbatches = self.schedule.config.microbatches
        self.device = torch.device(device) if device is not None else _default_device()
        layers = list(layers.children()) if isinstance(layers, nn.Sequential) else list(layers)
        placement = self.schedule.placement
        self.boundaries = split_layers(layers, placement.stages, partition, sample)
        self.stages = {
            stage: Stage(stage, first, layers[first:end]).to(self.device)
            for stage, (first, end) in enumerate(self.boundaries) if placement.stage_ranks[stage] == self.rank
        }
        optimizers = {}
        if optimizer is not None:
            for index, stage in self.stages.items():
                parameters = [p for p in stage.parameters() if p.requires_grad]
                if parameters:
                    optimizers[index] = optimizer(parameters)
        self.optimizers = optimizers
        # NCCL runs a pair's operations in issue order, so nothing is received ahead of the program there.
        lookahead = 0 if dist.get_backend() == "nccl" else 2
        self._early_loss_receive = lookahead > 0
        self._timeout = timeout
        self.executor = Executor(self.rank, placement, self.microbatches, self.stages, loss_fn, self.device,
                                 timeout, range(world), optimizers, lookahead)
        self.loss_rank = placement.stage_ranks[-1]
        self._forward_programs = forward_programs(self.schedule)
        self._metas: dict[tuple, tuple] = {}
        self.last_events: tuple[tuple, ...] = ()

    # ---------------------------------------------------------------- public surface
    def train_step(self, inputs: Tensors, targets: Tensors) -> float:
        """Run one training step on the whole batch; return the mean loss on every rank.

        Leaves in each local parameter's ``.grad`` the gradient of that mean
        loss and applies the optimizer when one was given.  Refuses a batch
        that does not split into equal micro-batches with ``ValueError``.
        """
        for stage in self.stages.values():
            stage.zero_grad(set_to_none=True)
        posted = self._post_loss_receive() if self._early_loss_receive else None
        result = self._run("train", self.schedule.programs, inputs, targets)
        return self._share_loss(result, posted)

    def eval_step(self, inputs: Tensors, targets: Tensors) -> float:
        """Return the mean loss over the batch without gradients (forward only, pipelined)."""
        posted = self._post_loss_receive() if self._early_loss_receive else None
        result = self._run("eval", self._forward_programs, inputs, targets)
        return self._share_loss(result, posted)

    def forward(self, inputs: Tensors):
        """Return the model's output for the batch on the last stage's rank (``None`` on the others)."""
        result = self._run("forward", self._forward_programs, inputs, None)
        if result.outputs is None:
            return None
        joined = tuple(torch.cat(parts) for parts in zip(*result.outputs))
        return joined[0] if len(joined) == 1 else joined

    __call__ = forward

    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """Yield this rank's parameters named as in ``nn.Sequential(*layers)`` (``"3.weight"``)."""
        for index in sorted(self.stages):
            yield from self.stages[index].named_model_parameters()

    def parameters(self) -> Iterator[nn.Parameter]:
        """Yield this rank's parameters."""
        for _, parameter in self.named_parameters():
            yield parameter

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Return this rank's parameters and buffers named as in ``nn.Sequential(*layers)``."""
        state = {}
        for index in sorted(self.stages):
            stage = self.stages[index]
            for offset, layer in enumerate(stage.layers):
                for name, tensor in layer.state_dict().items():
                    state[f"{stage.first + offset}.{name}"] = tensor
        return state

    def train(self, mode: bool = True) -> "Pipeline":
        """Set the local stages to training (or evaluation) mode; return the pipeline."""
        for stage in self.stages.values():
            stage.train(mode)
        return self

    def eval(self) -> "Pipeline":
        """Set the local stages to evaluation mode; return the pipeline."""
        return self.train(False)

    def timeline(self, title: str = "") -> Timeline:
        """Return the measured timeline of the last step, gathered from every rank (collective).

        Times are seconds from the earliest start on any rank.
        """
        events = list(self.last_events)
        if dist.get_world_size() > 1:
            gathered: list = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, events)
            events = [event for part in gathered for event in part]
        origin = min((event[3] for event in events), default=0.0)
        rows = tuple(sorted(((r, stream, str(action), start - origin, end - origin)
                             for r, stream, action, start, end in events), key=lambda row: (row[0], row[3])))
        return Timeline(self.schedule.config.ranks, rows, "measured", "s", title or self.schedule.config.schedule,
                        {"config": self.schedule.config.to_json()})

    # ---------------------------------------------------------------- internals
    def _run(self, mode: str, programs, inputs: Tensors, targets: Tensors | None) -> RunResult:
        input_parts = _split(inputs, self.microbatches, "inputs")
        target_parts = _split(targets, self.microbatches, "targets") if targets is not None else None
        signature = tuple((tuple(t.shape), t.dtype) for t in input_parts[0])
        metas = self._metas.get(signature)
        if metas is None:
            metas = self.executor.agree(input_parts[0])
            self._metas[signature] = metas
        mailbox = self.executor.mailbox((mode != "train", signature), programs, metas)
        result = self.executor.run(programs[self.rank], mailbox, metas, input_parts, target_parts,
                                   training=mode == "train")
        self.last_events = result.events
        return result

    def _post_loss_receive(self):
        """Post the receive of the step's mean loss from the last stage's rank (gloo: before the program runs)."""
        if self.rank == self.loss_rank:
            return None
        buffer = torch.zeros(1, dtype=torch.float64, device=self.device)
        return buffer, dist.irecv(buffer, src=self.loss_rank, tag=_LOSS_TAG)

    def _share_loss(self, result: RunResult, posted) -> float:
        """Return the step's mean loss: computed on the last stage's rank, sent point-to-point to the others.

        A receive posted before the program runs costs the other ranks
        nothing, where a broadcast would hold every rank at the end of the step.
        """
        world = dist.get_world_size()
        if self.rank == self.loss_rank:
            loss = result.loss_sum / self.microbatches
            if world > 1:
                value = torch.full((1,), loss, dtype=torch.float64, device=self.device)
                works = [dist.isend(value, dst=peer, tag=_LOSS_TAG) for peer in range(world) if peer != self.rank]
                for work in works:
                    wait_for(work, self._timeout, self.rank, "sending the step's loss to the other ranks")
            return loss
        buffer, work = posted if posted is not None else self._post_loss_receive()
        wait_for(work, self._timeout, self.rank, f"waiting for the step's loss from rank {self.loss_rank}")
        return float(buffer.item())


def _split(batch: Tensors, microbatches: int, name: str) -> list[tuple[torch.Tensor, ...]]:
    tensors = as_tuple(batch if isinstance(batch, torch.Tensor) else tuple(batch))
    size = tensors[0].shape[0] if tensors and tensors[0].dim() else 0
    if size == 0 or size % microbatches or any(t.shape[0] != size for t in tensors):
        raise ValueError(f"{name} batch of {size} samples: must split into {microbatches} equal micro-batches "
                         f"(a multiple of microbatches={microbatches} along the first dimension)")
    return list(zip(*(t.chunk(microbatches) for t in tensors)))


def _python_names(message: str) -> str:
    """Return a schedule configuration message with the command line's option names as ``Pipeline`` arguments."""
    for flag in ("--group-size", "--stages-per-rank", "--microbatches", "--schedule", "--placement", "--ranks"):
        message = message.replace(flag, flag[2:].replace("-", "_"))
    return message


def _default_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _refuse_later_options(data_parallel: int, zero: int, recompute) -> None:
    if data_parallel != 1:
        raise ConfigError(f"data_parallel={data_parallel}: the runtime runs one pipeline replica so far "
                          f"(data_parallel=1); the simulator already models --dp")
    if zero != 0:
        raise ConfigError(f"zero={zero}: sharded data parallelism is not in the runtime yet (zero=0)")
    if recompute:
        raise ConfigError(f"recompute={recompute!r}: activation recomputation is not in the runtime yet "
                          f"(recompute=())")


def peak_memory_bytes(device: torch.device) -> int:
    """Return this process's peak memory: CUDA allocator peak on GPU, peak resident set size on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024

