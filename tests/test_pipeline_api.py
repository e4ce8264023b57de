"""The Pipeline surface: parameter names, evaluation, pipelined inference and measured timelines."""

from __future__ import annotations

import pytest
import torch
from runtime_models import Chain, batch, mlp_layers, relative_error
from torch import nn

import layerpipe
from layerpipe.schedule.actions import COMPUTE_KINDS

pytestmark = pytest.mark.multiprocess


def _surface():
    layers = mlp_layers()
    reference = Chain(*[layer for layer in mlp_layers()])
    pipe = layerpipe.Pipeline(
        layers, nn.functional.mse_loss, schedule="interleaved", microbatches=4, stages_per_rank=2, timeout=30
    )
    inputs, targets = batch(8)
    rank = torch.distributed.get_rank()
    expected_output = reference(inputs).detach()
    expected_loss = float(nn.functional.mse_loss(expected_output, targets))
    evaluated = pipe.eval_step(inputs, targets)
    output = pipe.forward(inputs)
    output_error = None if output is None else relative_error(output, expected_output)
    grads_untouched = all(p.grad is None or not p.grad.any() for p in pipe.parameters())
    pipe.train_step(inputs, targets)
    timeline = pipe.timeline()
    program = pipe.schedule.programs[rank]
    return {
        "names": [name for name, _ in pipe.named_parameters()],
        "owned": {
            name: relative_error(p.detach(), dict(reference.named_parameters())[name].detach())
            for name, p in pipe.named_parameters()
        },
        "eval_error": abs(evaluated - expected_loss) / expected_loss,
        "output_error": output_error,
        "grads_untouched": grads_untouched,
        "compute_events": sorted(str(e[2]) for e in timeline.events if e[0] == rank and e[1] == "compute"),
        "program_compute": sorted(str(a) for a in program if a.kind in COMPUTE_KINDS or a.kind.value == "STEP"),
        "sources": (timeline.source, timeline.unit, timeline.ranks),
        "starts_at_zero": min(e[3] for e in timeline.events) == 0.0,
    }


def test_named_parameters_eval_step_forward_and_timeline_on_two_ranks():
    results = layerpipe.launch(_surface, 2, timeout=60)
    names = [name for result in results for name in result["names"]]
    assert sorted(names) == sorted(name for name, _ in Chain(*mlp_layers()).named_parameters())
    assert all(error == 0.0 for result in results for error in result["owned"].values()), (
        "pipe.named_parameters() names layers[i]'s parameters 'i.<name>' (same values as the reference)"
    )
    for result in results:
        assert result["eval_error"] <= 1e-12
        assert result["grads_untouched"], "eval_step and forward leave gradients alone"
        assert result["compute_events"] == result["program_compute"], "one measured event per compute action"
        assert result["sources"] == ("measured", "s", 2)
        assert result["starts_at_zero"]
    assert results[0]["output_error"] is None, "outputs live on the last stage's rank only"
    assert results[1]["output_error"] <= 1e-12


def _gradients_after_a_user_zero_grad():
    pipe = layerpipe.Pipeline(mlp_layers(), nn.functional.mse_loss, microbatches=2, timeout=30)
    inputs, targets = batch(4)
    pipe.train_step(inputs, targets)
    first = {name: p.grad.clone() for name, p in pipe.named_parameters()}
    for parameter in pipe.parameters():
        parameter.grad = None  # what optimizer.zero_grad() does by default
    pipe.train_step(inputs, targets)
    return max(float((p.grad - first[name]).abs().max()) for name, p in pipe.named_parameters())


@pytest.mark.multiprocess
def test_a_step_after_zero_grad_sets_grads_to_none_still_accumulates_from_zero():
    assert layerpipe.launch(_gradients_after_a_user_zero_grad, 2) == [0.0, 0.0]


def _recompute_modes_of_each_way_to_give_a_schedule():
    from layerpipe.schedule.build import build_schedule
    from layerpipe.schedule.config import ScheduleConfig

    config = ScheduleConfig("breadth-first", ranks=2, microbatches=2, recompute="selective")
    ways = {
        "keywords": dict(schedule="breadth-first", microbatches=2, recompute="selective"),
        "config": dict(schedule=config),
        "built": dict(schedule=build_schedule(config)),
    }
    found = {}
    for name, options in ways.items():
        pipe = layerpipe.Pipeline(mlp_layers(), nn.functional.mse_loss, timeout=30, **options)
        found[name] = {stage: local.recompute for stage, local in pipe.executor.stages.items()}
    return found


def test_a_config_or_a_built_schedule_keeps_selective_recomputation_as_keywords_do():
    for found in layerpipe.launch(_recompute_modes_of_each_way_to_give_a_schedule, 2):
        assert found["keywords"] == found["config"] == found["built"]
        assert set(found["built"].values()) <= {"selective", "none"} and "selective" in found["built"].values()


def _message_groups():
    layers = mlp_layers()
    pipe = layerpipe.Pipeline(
        layers, nn.functional.mse_loss, schedule="interleaved", microbatches=4, stages_per_rank=2, timeout=30
    )
    context, downward = pipe.executor.context, pipe.groups.downward
    return {
        "downward_members": torch.distributed.get_process_group_ranks(downward),
        "down_is_own_group": context.group_of(1, 0) is downward and downward is not None,
        "up_is_default": context.group_of(0, 1) is None,
    }


def test_on_gloo_messages_to_a_lower_rank_go_on_a_group_of_their_own():
    # A gloo pair with a receive posted holds back the sends on it: each pair of each group carries one way only.
    for found in layerpipe.launch(_message_groups, 2, timeout=60, backend="gloo"):
        assert found == {"downward_members": [0, 1], "down_is_own_group": True, "up_is_default": True}


def _accessors():
    pipe = layerpipe.Pipeline(
        mlp_layers(), nn.functional.mse_loss, schedule="gpipe", microbatches=2, data_parallel=2, zero=3, timeout=30
    )
    try:
        pipe.boundary_metas()
        before = "agreed"
    except LookupError:
        before = "none yet"
    pipe.train_step(*batch(8))
    metas = pipe.boundary_metas()
    released = [shard.gathered for shard in pipe.shards.values()]
    with pipe.weights_gathered("to read them whole"):
        held = [shard.gathered for shard in pipe.shards.values()]
    after = [shard.gathered for shard in pipe.shards.values()]
    return dict(before=before, metas=metas == next(pipe.shapes.agreed()), held=(released, held, after))


def test_the_agreed_shapes_and_whole_weights_have_public_accessors():
    """What ``layerpipe calibrate`` reads: the boundary metas of the first batch, and the weights held whole at ZeRO-3."""
    for result in layerpipe.launch(_accessors, 2, timeout=60):
        assert result["before"] == "none yet" and result["metas"]
        assert result["held"] == ([False], [True], [False])


def _threads() -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("Threads"))


def closed_pipelines_keep_no_threads() -> tuple[int, int, float]:
    """Worker: threads after one closed 2×2 pipeline with a tie, after five more, and the last one's loss."""

    def layers():
        chain = [nn.Linear(4, 4).double() for _ in range(4)]
        chain[-1].weight = chain[0].weight  # tied across stages: the tie sums over a group of its own
        return chain

    inputs, targets = torch.randn(8, 4, dtype=torch.float64), torch.randn(8, 4, dtype=torch.float64)
    counts, loss = [], None
    for _ in range(2):
        for _ in range(1 if not counts else 5):
            with layerpipe.Pipeline(layers(), nn.functional.mse_loss, "1f1b", microbatches=2, data_parallel=2) as pipe:
                loss = pipe.train_step(inputs, targets)
                pipe.close()  # and once more on leaving the block: the second call does nothing
        counts.append(_threads())
    return counts[0], counts[1], loss


@pytest.mark.multiprocess
@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/status"), reason="counts threads in /proc")
def test_a_closed_pipeline_releases_its_process_groups_and_their_threads():
    """Every gloo group keeps threads until destroyed: without ``close`` a process building pipelines in a loop
    gathers thousands of them."""
    for first, later, loss in layerpipe.launch(closed_pipelines_keep_no_threads, 4, timeout=120):
        assert later <= first + 2, f"threads grew from {first} to {later} over five closed pipelines"
        assert loss == loss and loss > 0
