"""``loss.png``: the training loss, and with clipping the global gradient norm in a panel below it on the same steps."""

from __future__ import annotations

from types import SimpleNamespace

import matplotlib.image

from layerpipe.train.report import plot_losses


def record(grad_norms, clip_grad_norm):
    demo = SimpleNamespace(loss_label="cross-entropy", title="small GPT")
    config = SimpleNamespace(pipeline=SimpleNamespace(schedule="breadth-first", clip_grad_norm=clip_grad_norm))
    return SimpleNamespace(losses=(3.0, 2.5, 2.2, 2.0), grad_norms=grad_norms, demo=demo, config=config)


def test_the_gradient_norm_is_drawn_below_the_loss_and_a_skipped_step_leaves_a_gap(tmp_path):
    plain, clipped = tmp_path / "plain.png", tmp_path / "clipped.png"
    plot_losses(record(None, None), str(plain))
    plot_losses(record((2.0, float("inf"), 1.2, 0.8), 1.0), str(clipped))
    plain_height, clipped_height = (matplotlib.image.imread(path).shape[0] for path in (plain, clipped))
    assert clipped_height > 1.5 * plain_height, "a second panel below the loss"
