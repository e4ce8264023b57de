"""``layerpipe train`` warms up and clips by default (``layerpipe/train/defaults.py``), so no default run spikes.

The defaults were chosen from ``benchmarks/training_defaults.py``'s loss
curves (docs/training.md).  Here: the rule (a quarter of the steps, at most
100, and a clip limit of 1.0 where clipping can run), what ``--help`` says,
and the run of issue 24 — 20 steps at the default settings, whose loss rose
from 3.26 to 6.88 — which the old settings still spike and the defaults do
not.  The run is in one process, as the benchmark's is (it checks that
``layerpipe train`` gives the same losses).
"""

from __future__ import annotations

from layerpipe.train.config import TrainConfig, config_from, replaced
from layerpipe.train.config import build_parser as train_parser
from layerpipe.train.defaults import CLIP_GRAD_NORM, default_warmup


def configured(tmp_path, *options: str) -> TrainConfig:
    """Return the configuration ``layerpipe train OPTIONS`` would run."""
    return config_from(train_parser().parse_args([*options, "--output", str(tmp_path / "run")]))


def test_the_default_warm_up_is_a_quarter_of_the_steps_at_most_100_and_always_below_them():
    assert [default_warmup(steps) for steps in (1, 3, 4, 20, 100, 400, 1000, 10_000)] == [0, 0, 1, 5, 25, 100, 100, 100]
    assert all(default_warmup(steps) < steps for steps in range(1, 2000))
    assert TrainConfig().warmup == 100 and TrainConfig(steps=20).warmup == 5
    assert TrainConfig(steps=20, warmup_steps=0).warmup == 0 and TrainConfig(warmup_steps=7).warmup == 7
    assert TrainConfig(steps=20).to_json()["warmup_steps"] == 5, "the summary says what the run used"


def test_train_clips_by_default_except_where_clipping_cannot_run_or_none_is_asked(tmp_path):
    assert configured(tmp_path).pipeline.clip_grad_norm == CLIP_GRAD_NORM == 1.0
    assert configured(tmp_path, "--steps", "1").warmup == 0, "a one-step run is accepted"
    assert configured(tmp_path, "--clip-grad-norm", "none").pipeline.clip_grad_norm is None
    assert configured(tmp_path, "--clip-grad-norm", "0.5").pipeline.clip_grad_norm == 0.5
    (tmp_path / "off.toml").write_text('clip_grad_norm = "none"\n')  # TOML has no null
    assert configured(tmp_path, "--config", str(tmp_path / "off.toml")).pipeline.clip_grad_norm is None
    assert configured(tmp_path, "--schedule", "async").pipeline.clip_grad_norm is None
    assert configured(tmp_path, "--step-placement", "early").pipeline.clip_grad_norm is None
    helps = {action.dest: action.help for action in train_parser()._actions}
    assert helps["clip_grad_norm"].endswith("(default: 1.0, off for async; none: off)")
    assert helps["warmup_steps"].endswith("(default: a quarter of --steps, at most 100)")


def losses_in_one_process(config: TrainConfig, taken: int) -> list[float]:
    """Return the training losses of the first ``taken`` steps of ``config`` run in one process, as ``layerpipe
    train`` computes them."""
    import torch
    from torch import nn

    from layerpipe.train.loop import get_lr, make_optimizer
    from layerpipe.train.tasks import GPTTask

    task = GPTTask(config)
    model = nn.Sequential(*task.layers())
    optimizer = make_optimizer(config)(model.parameters())
    generator, losses, limit = torch.Generator().manual_seed(config.seed), [], config.pipeline.clip_grad_norm
    for step in range(taken):
        for group in optimizer.param_groups:
            group["lr"] = get_lr(step, config)
        inputs, targets = task.batch(generator)
        loss = task.loss_fn(model(inputs), targets)
        loss.backward()
        if limit is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), limit)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def test_a_short_default_run_never_rises_above_its_first_loss_as_the_old_settings_did():
    defaults = TrainConfig(steps=20)
    old = replaced(defaults, warmup_steps=0, clip_grad_norm=None)
    spiked, calm = losses_in_one_process(old, 9), losses_in_one_process(defaults, 20)
    assert spiked[8] > spiked[0] + 1.0, "the run of issue 24 spikes at step 9 with neither warm-up nor clipping"
    assert max(calm[1:]) < calm[0], calm
