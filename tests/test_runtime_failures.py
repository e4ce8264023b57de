"""What users see when a pipeline run goes wrong: one clear message, every rank ends, waits time out."""

from __future__ import annotations

import dataclasses
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from runtime_models import batch, mlp_layers
from torch import nn

import layerpipe
from layerpipe.runtime.launch import LaunchError
from layerpipe.runtime.partition import PartitionError, partition
from layerpipe.runtime.stage import PipelineError
from layerpipe.schedule.actions import Kind
from layerpipe.schedule.build import build_schedule
from layerpipe.schedule.config import ConfigError, ScheduleConfig

pytestmark = pytest.mark.multiprocess


def _train_once(samples: int, microbatches: int, layers=None, schedule="breadth-first", timeout=60.0):
    layers = layers if layers is not None else mlp_layers()
    pipe = layerpipe.Pipeline(
        layers, nn.functional.mse_loss, schedule=schedule, microbatches=microbatches, stages_per_rank=1, timeout=timeout
    )
    inputs, targets = batch(samples)
    return pipe.train_step(inputs, targets)


def test_a_batch_that_does_not_split_into_microbatches_is_refused_with_the_sizes():
    with pytest.raises(LaunchError) as caught:
        layerpipe.launch(_train_once, 2, (10, 4))
    assert "inputs batch of 10 samples: must split into microbatches=4 equal micro-batches" in str(caught.value)


def test_fewer_layers_than_stages_is_refused_before_any_process_starts():
    with pytest.raises(PartitionError, match="the model has 3 layers but the pipeline has 4 stages"):
        partition([nn.Linear(2, 2) for _ in range(3)], 4)


def test_fewer_layers_than_stages_is_refused_inside_a_pipeline():
    with pytest.raises(LaunchError, match="the model has 1 layers but the pipeline has 2 stages"):
        layerpipe.launch(_train_once, 2, (4, 2, [nn.Linear(6, 3).double()]))


class RaiseOnRank(nn.Module):
    """Raises on the given rank once the step's second micro-batch arrives (after shapes were agreed)."""

    def __init__(self, rank: int):
        super().__init__()
        self.rank = rank
        self.calls = 0
        self.linear = nn.Linear(6, 6)

    def forward(self, x):
        self.calls += 1
        if torch.distributed.get_rank() == self.rank and self.calls > 2:
            raise ValueError(f"boom in a layer on rank {self.rank}")
        return self.linear(x)


def _train_with_a_failing_layer():
    layers = [nn.Linear(6, 6).double(), RaiseOnRank(1).double(), nn.Linear(6, 3).double()]
    return _train_once(8, 4, layers, timeout=600.0)


@pytest.mark.timeout(120)
def test_a_layer_raising_on_one_rank_stops_every_rank_and_shows_the_original_error():
    with pytest.raises(LaunchError) as caught:
        layerpipe.launch(_train_with_a_failing_layer, 2)
    message = str(caught.value)
    assert message.startswith("rank 1 failed:")
    assert "ValueError: boom in a layer on rank 1" in message
    assert 0 in caught.value.reports, "rank 0, blocked on a receive, is stopped and reported"


def _train_with_a_lost_send():
    schedule = build_schedule(ScheduleConfig("gpipe", ranks=2, microbatches=2))
    programs = list(schedule.programs)
    programs[0] = tuple(a for a in programs[0] if not (a.kind is Kind.SEND_F and a.microbatch == 1))
    broken = dataclasses.replace(schedule, programs=tuple(programs))
    # Rank 1 times out first, for sure: rank 0 would otherwise race it and, leaving, turn rank 1's timeout into a failure.
    timeout = 2.0 if torch.distributed.get_rank() == 1 else 6.0
    pipe = layerpipe.Pipeline(mlp_layers(), nn.functional.mse_loss, schedule=broken, timeout=timeout)
    inputs, targets = batch(4)
    return pipe.train_step(inputs, targets)


@pytest.mark.timeout(120)
def test_a_hang_times_out_and_each_rank_names_its_blocked_action_and_peer():
    with pytest.raises(LaunchError) as caught:
        layerpipe.launch(_train_with_a_lost_send, 2, timeout=2.0)
    reports = caught.value.reports
    assert set(reports) == {0, 1}
    assert (
        "rank 1: timed out after 2 s at 1RECV_F1 waiting for stage 0's output for micro-batch 1 from rank 0"
        in reports[1]
    )
    assert (
        "at 0RECV_B0 waiting for the gradient of stage 0's output for micro-batch 0 (from stage 1) from rank 1"
        in reports[0]
    )


class ShrinkOnLargeInput(nn.Module):
    """Drops a column when the micro-batch's first value is large: a shape that changes after the first step."""

    def forward(self, x):
        return x[:, :-1] if float(x[0, 0]) > 100 else x


def _train_with_a_changing_shape():
    layers = [ShrinkOnLargeInput(), nn.Linear(6, 3).double()]
    pipe = layerpipe.Pipeline(layers, nn.functional.mse_loss, schedule="gpipe", microbatches=4, timeout=30.0)
    inputs, targets = batch(8)
    pipe.train_step(inputs, targets)
    inputs[4, 0] = 1000.0  # first sample of micro-batch 2
    return pipe.train_step(inputs, targets)


@pytest.mark.timeout(120)
def test_a_stage_output_that_changes_shape_names_the_stage_and_microbatch():
    with pytest.raises(LaunchError) as caught:
        layerpipe.launch(_train_with_a_changing_shape, 2, timeout=10.0)
    assert "stage 0 produced (float64[2, 5]) for micro-batch 2, but the pipeline agreed on (float64[2, 6])" in str(
        caught.value
    )


@pytest.mark.parametrize(
    "options, text",
    [
        ({"data_parallel": 2}, "data_parallel=2: must divide the 1 processes"),
        ({"zero": 4}, "zero=4: choose one of 0, 1, 2, 3"),
        ({"zero": 3}, "zero=3: shards over data-parallel replicas: needs data_parallel above 1"),
        ({"recompute": "all"}, "recompute='all': choose one of none, full, selective"),
        ({"recompute": ["full"]}, r"recompute=\('full',\): the last stage \(0\) cannot recompute"),
        ({"recompute": ["none", "full"]}, "give one mode for each of the 1 stages"),
        ({"reduce_portions": 0}, "reduce_portions=0: must be a whole number of at least 1"),
        ({"replicas": 2}, "replicas=2: not an option of Pipeline; the schedule options are microbatches, "),
        ({"schedule": "async"}, "optimizer=None: async updates every stage inside the stream: give optimizer="),
        ({"schedule": "async", "update_every": 0}, "update_every=0: must be a whole number of at least 1"),
        (
            {"schedule": "async", "weight_policy": "newest"},
            "weight_policy='newest': choose one of stashed, double-buffered, live",
        ),
        ({"weight_policy": "live"}, "weight_policy='live': only the async schedule takes it"),
        (
            {"schedule": "async", "delay_correction": "spike", "optimizer": "adam"},
            "delay_correction='spike': reads the momentum of torch.optim.SGD with momentum > 0, no dampening and no "
            "Nesterov; the optimizer is AdamW",
        ),
        (
            {"schedule": "async", "delay_correction": "predict", "optimizer": "sgd"},
            r"the optimizer is SGD\(momentum=0, dampening=0, nesterov=False\)",
        ),
    ],
)
def test_bad_data_parallel_and_recompute_options_are_refused_in_one_line(options, text):
    message = layerpipe.launch(_refused_message, 1, (options,))[0]
    assert re.search(text, message), message
    assert "\n" not in message


OPTIMIZERS = {"adam": lambda params: torch.optim.AdamW(params), "sgd": lambda params: torch.optim.SGD(params, lr=0.1)}


def _refused_message(options: dict) -> str:
    options = dict(options)
    optimizer = OPTIMIZERS.get(options.pop("optimizer", None))
    try:
        layerpipe.Pipeline(
            mlp_layers(),
            nn.functional.mse_loss,
            microbatches=2,
            optimizer=optimizer,
            **{"stages_per_rank": 1, **options},
        )
    except ConfigError as error:
        return str(error)
    return "accepted"


def _grouped_without_group_size():
    layerpipe.Pipeline(mlp_layers(), nn.functional.mse_loss, schedule="grouped", microbatches=4)


def test_schedule_options_are_refused_with_the_python_argument_names():
    with pytest.raises(
        LaunchError,
        match=r"group_size=None: the grouped schedule needs one, between ranks \(2\) "
        r"and microbatches \(4\)",
    ):
        layerpipe.launch(_grouped_without_group_size, 2)


def _killed_on_rank_one():
    if torch.distributed.get_rank() == 1:
        time.sleep(0.5)
        os.kill(os.getpid(), signal.SIGKILL)
    torch.distributed.barrier()  # rank 0 waits for the rank that is gone


@pytest.mark.timeout(120)
def test_a_killed_process_is_named_first_with_its_signal():
    with pytest.raises(LaunchError) as caught:
        layerpipe.launch(_killed_on_rank_one, 2, timeout=20.0)
    message = str(caught.value)
    assert message.startswith("rank 1 failed: killed by signal 9 (SIGKILL) before it could report"), message
    assert 0 in caught.value.reports


def _listening_sockets_of_this_process() -> list[str]:
    """Return the local addresses (hex, as /proc/net shows them) of the TCP sockets this process listens on."""
    own = set()
    for descriptor in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{descriptor}")
        except OSError:
            continue
        if target.startswith("socket:["):
            own.add(target[8:-1])
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in open(table).read().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in own:  # 0A: LISTEN
                found.append(fields[1].split(":")[0])
    return found


def _listening_after_a_step() -> list[str]:
    pipe = layerpipe.Pipeline(mlp_layers(), nn.functional.mse_loss, schedule="gpipe", microbatches=2, timeout=30)
    pipe.train_step(*batch(4))
    return _listening_sockets_of_this_process()


@pytest.mark.skipif(not os.path.exists("/proc/net/tcp"), reason="reads Linux's socket table")
def test_a_local_run_listens_on_loopback_only():
    loopback = {"0100007F", "00000000000000000000000001000000"}  # 127.0.0.1, and ::1 as /proc/net/tcp6 writes it
    per_rank = layerpipe.launch(_listening_after_a_step, 2)
    assert all(per_rank), "gloo listens for its peers"
    assert all(address in loopback for addresses in per_rank for address in addresses), per_rank


def _train_on_a_batch_of_my_own():
    pipe = layerpipe.Pipeline(mlp_layers(), nn.functional.mse_loss, schedule="gpipe", microbatches=2, timeout=30)
    inputs, targets = batch(4, seed=1 + torch.distributed.get_rank())
    return pipe.train_step(inputs, targets)


def test_processes_handed_different_batches_are_refused():
    with pytest.raises(LaunchError, match="the processes were handed different batches"):
        layerpipe.launch(_train_on_a_batch_of_my_own, 2)


def _targets_of_another_size():
    pipe = layerpipe.Pipeline(mlp_layers(), nn.functional.mse_loss, schedule="gpipe", microbatches=2, timeout=30)
    inputs, targets = batch(8)
    try:
        pipe.train_step(inputs, targets[:4])
    except ValueError as error:
        return str(error)
    return "accepted"


def test_targets_of_another_batch_size_are_named():
    message = layerpipe.launch(_targets_of_another_size, 1)[0]
    assert message == "targets: a batch of 4 samples, but the inputs have 8: give one target per sample"


FROZEN_PEER = """
import time, torch, layerpipe
from torch import nn
from runtime_models import batch, mlp_layers

def train():
    pipe = layerpipe.Pipeline(mlp_layers(), nn.functional.mse_loss, schedule="gpipe", microbatches=2, timeout=30)
    pipe.train_step(*batch(4))
    if torch.distributed.get_rank() == 1:
        time.sleep(2.6)  # frozen for a while
    return pipe.train_step(*batch(4))

if __name__ == "__main__":
    layerpipe.launch(train, 2)
"""


def waiting_reports(tmp_path, text: str) -> str:
    """Run the two-process script ``text`` with a "still waiting" line every second; return its stderr."""
    script = tmp_path / "frozen.py"
    script.write_text(text)
    environment = {
        **os.environ,
        "LAYERPIPE_WAIT_REPORT_SECONDS": "1",
        "PYTHONPATH": os.pathsep.join([os.path.dirname(__file__), os.environ.get("PYTHONPATH", "")]),
    }
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, env=environment)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stderr


def test_a_frozen_peer_is_reported_while_the_rank_waits(tmp_path):
    # the seconds a report shows depend on when its thread runs on a busy machine: any whole number will do
    reports = waiting_reports(tmp_path, FROZEN_PEER)
    assert re.search(r"rank 0 still waiting at 0RECV_B\S* .*from rank 1, \d+ s of 30", reports), reports


FROZEN_BEFORE_THE_FIRST_STEP = """
import time, torch, layerpipe
from torch import nn
from runtime_models import batch, mlp_layers

def train():
    pipe = layerpipe.Pipeline(mlp_layers(), nn.functional.mse_loss, schedule="gpipe", microbatches=2, timeout=30,
                              check_every=0)  # no batch checksum, whose wait would come first
    if torch.distributed.get_rank() == 0:
        time.sleep(2.6)  # frozen before the first step, whose shapes are agreed first
    return pipe.train_step(*batch(4))

if __name__ == "__main__":
    layerpipe.launch(train, 2)
"""


def test_a_peer_frozen_before_the_first_step_is_reported_while_the_shapes_are_agreed(tmp_path):
    reports = waiting_reports(tmp_path, FROZEN_BEFORE_THE_FIRST_STEP)
    assert re.search(
        r"rank 1 still waiting while agreeing tensor shapes for stage 0's output from rank 0, \d+ s "
        r"of 30",
        reports,
    ), reports


@pytest.mark.parametrize("timeout", [0, -5, float("inf"), "30"])
def test_a_timeout_that_is_not_a_positive_number_is_refused_before_any_process_starts(timeout):
    with pytest.raises(ValueError, match=r"timeout .*: must be a finite number of seconds above 0"):
        layerpipe.launch(print, 1, timeout=timeout)


def _targets_that_would_broadcast():
    pipe = layerpipe.Pipeline(mlp_layers(), nn.functional.mse_loss, schedule="gpipe", microbatches=2, timeout=30)
    inputs, targets = batch(4)
    try:
        pipe.train_step(inputs, targets[:, :1])
    except PipelineError as error:
        return str(error)
    return "accepted"


def test_targets_that_would_broadcast_against_the_output_are_refused():
    message = layerpipe.launch(_targets_that_would_broadcast, 1)[0]
    assert message == (
        "rank 0: the last stage's output for micro-batch 0 has shape (2, 3) but its targets (2, 1): "
        "the loss would broadcast one against the other; give targets shaped like the output"
    )


def _exchange_and_look_for_pickles():
    import pickle
    from unittest import mock

    from layerpipe.runtime.exchange import all_gather_json

    value = {"rank": torch.distributed.get_rank(), "events": [[0, "compute", "0F1", 0.5, 1.0]]}
    with mock.patch.object(pickle, "loads", side_effect=AssertionError("something unpickled")):
        return all_gather_json(value)


def test_values_ranks_exchange_cross_as_json_and_arrive_in_rank_order():
    gathered = layerpipe.launch(_exchange_and_look_for_pickles, 2)
    assert (
        gathered[0]
        == gathered[1]
        == [
            {"rank": 0, "events": [[0, "compute", "0F1", 0.5, 1.0]]},
            {"rank": 1, "events": [[0, "compute", "0F1", 0.5, 1.0]]},
        ]
    )
