"""The worked example of docs/one-process.md, "Splitting your model into layers", trains as the unsplit model.

A Transformer encoder classifier with a padding mask, written as an ordinary ``nn.Module``, is split into
layers that share its modules; the bool mask travels between layers as the second tensor of a tuple, and
``nn.TransformerEncoderLayer`` gets it by keyword (its second positional argument is ``src_mask``).  On 2
processes in float64 its losses and parameters after 3 AdamW steps equal the unsplit model's in one process
doing the same gradient accumulation.  The page's code block is this file's, character for character.

SGD, not AdamW: the gradient of the attention's key bias is zero (the softmax ignores it), and AdamW's step
``g / sqrt(v)`` turns its rounding noise (about 1e-18) into full-size steps that differ with any change in the
order of a sum, so two exact runs would end 1e-10 apart.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from runtime_models import relative_error
from torch import nn

import layerpipe

TOLERANCE = 1e-10
PAGE = Path(__file__).resolve().parents[1] / "docs" / "one-process.md"
START, END = "# --- the example of docs/one-process.md begins\n", "# --- the example ends\n"


# --- the example of docs/one-process.md begins
class Classifier(nn.Module):
    """An ordinary model: embeddings, a Transformer encoder that ignores padding, a mean over tokens, a head."""

    def __init__(self, vocabulary=20, length=6, width=8, heads=2, depth=2, classes=3):
        super().__init__()
        self.tokens = nn.Embedding(vocabulary, width)
        self.positions = nn.Embedding(length, width)
        layer = nn.TransformerEncoderLayer(width, heads, 2 * width, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.head = nn.Linear(width, classes)

    def forward(self, tokens, padding):  # padding: bool (batch, time), True where there is no token
        x = self.tokens(tokens) + self.positions(torch.arange(tokens.shape[1]))
        x = self.encoder(x, src_key_padding_mask=padding)
        return self.head(mean_over_tokens(x, padding))


def mean_over_tokens(x, padding):
    kept = (~padding).unsqueeze(-1).to(x.dtype)
    return (x * kept).sum(1) / kept.sum(1)


class Embed(nn.Module):
    """Layer 0: the embeddings; passes the mask on."""

    def __init__(self, model):
        super().__init__()
        self.tokens, self.positions = model.tokens, model.positions

    def forward(self, tokens, padding):
        return self.tokens(tokens) + self.positions(torch.arange(tokens.shape[1])), padding


class Encode(nn.Module):
    """One encoder layer, given the mask by keyword: TransformerEncoderLayer's second positional is src_mask."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, x, padding):
        return self.layer(x, src_key_padding_mask=padding), padding


class Head(nn.Module):
    """The last layer: the mean over the tokens that are there, then the head."""

    def __init__(self, model):
        super().__init__()
        self.head = model.head

    def forward(self, x, padding):
        return self.head(mean_over_tokens(x, padding))


def split(model: Classifier) -> list[nn.Module]:
    """Return the model as a list of layers that share its modules (nothing is copied)."""
    return [Embed(model), *(Encode(layer) for layer in model.encoder.layers), Head(model)]


def sentences(seed: int, samples: int = 8, length: int = 6) -> tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Return ((tokens, padding), labels): sentences of 1 to ``length`` tokens, padded to ``length``."""
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, length + 1, (samples,), generator=generator)
    padding = torch.arange(length) >= lengths.unsqueeze(1)
    tokens = torch.randint(1, 20, (samples, length), generator=generator).masked_fill(padding, 0)
    return (tokens, padding), torch.randint(0, 3, (samples,), generator=generator)


def train(steps: int = 3) -> tuple[list[float], float, dict[str, torch.Tensor]]:
    """Run in every process: train the split model; return the losses, a test loss and this process's weights."""
    torch.manual_seed(0)  # every process builds the same model
    model = Classifier().double()
    pipe = layerpipe.Pipeline(
        split(model),
        nn.functional.cross_entropy,
        microbatches=2,
        optimizer=lambda parameters: torch.optim.SGD(parameters, lr=0.1, momentum=0.9),
    )
    losses = [pipe.train_step(*sentences(step)) for step in range(steps)]
    test_loss = pipe.eval_step(*sentences(seed=100, samples=7))  # in evaluation mode; 7 samples split 4 and 3
    return losses, test_loss, pipe.gathered_state_dict()


# --- the example ends


def reference(steps: int = 3, microbatches: int = 2) -> tuple[list[float], float, dict[str, torch.Tensor]]:
    """Return the unsplit model's losses, test loss (in evaluation mode) and parameters, named as the layers name
    them, after gradient accumulation over the same micro-batches."""
    torch.manual_seed(0)
    model = Classifier().double()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    losses = []
    for step in range(steps):
        (tokens, padding), labels = sentences(step)
        optimizer.zero_grad()
        parts = zip(tokens.chunk(microbatches), padding.chunk(microbatches), labels.chunk(microbatches))
        step_losses = []
        for part_tokens, part_padding, part_labels in parts:
            loss = nn.functional.cross_entropy(model(part_tokens, part_padding), part_labels) / microbatches
            loss.backward()
            step_losses.append(float(loss.detach()))
        optimizer.step()
        losses.append(sum(step_losses))
    inputs, labels = sentences(seed=100, samples=7)
    model.eval()
    with torch.no_grad():
        test_loss = float(nn.functional.cross_entropy(model(*inputs), labels))
    return losses, test_loss, {name: p.detach().clone() for name, p in nn.Sequential(*split(model)).named_parameters()}


@pytest.mark.multiprocess
def test_the_split_transformer_encoder_trains_as_the_unsplit_model_in_one_process():
    expected_losses, expected_test_loss, expected = reference()
    found = {}
    for losses, test_loss, state in layerpipe.launch(train, 2, timeout=120):
        assert all(abs(a - b) <= TOLERANCE * abs(b) for a, b in zip(losses, expected_losses)), (losses, expected_losses)
        assert abs(test_loss - expected_test_loss) <= TOLERANCE * expected_test_loss
        found.update(state)
    assert sorted(found) == sorted(expected)
    for name, value in expected.items():
        assert relative_error(found[name], value) <= TOLERANCE, name
    torch.manual_seed(0)
    initial = dict(nn.Sequential(*split(Classifier().double())).named_parameters())
    assert not any(torch.equal(initial[name], value) for name, value in expected.items()), "every weight trained"


def test_the_page_shows_this_files_example_character_for_character():
    source = Path(__file__).read_text(encoding="utf-8")
    example = source[source.index(START) + len(START) : source.index(END)].strip("\n") + "\n"
    section = PAGE.read_text(encoding="utf-8").split("## Splitting your model into layers", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"^```python\n(.*?)^```", section, flags=re.S | re.M)
    assert example in blocks, "docs/one-process.md's example differs from tests/test_splitting.py's"
