"""The demos ``layerpipe train`` trains: what each builds, feeds, evaluates and shows at the end.

``GPTTask`` trains the character-level GPT on Shakespeare's plays and
samples text from it; ``SuperResTask`` trains the 2× super-resolution
network on photographs and compares it with bicubic enlargement on
held-out ones.  The loop in ``loop.py`` knows only this interface.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from ..checkpoint_files import find_checkpoint
from ..models.gpt import GPTConfig, dense_shapes, gpt_layers, next_token_loss
from ..models.text import CharacterText
from ..ops import sparsify
from ..runtime.checkpoint import load_weights
from ..runtime.exchange import all_gather_json
from ..runtime.pipeline import Pipeline
from .config import TrainConfig


@dataclass(frozen=True)
class Outcome:
    """What a demo adds to the run's report: summary entries, files it wrote, and closing lines to print."""

    summary: dict = field(default_factory=dict)
    files: tuple[str, ...] = ()
    lines: tuple[str, ...] = ()


class GPTTask:
    """The character-level GPT on Shakespeare's plays (or CPython's help text without the ``shakespeare`` package)."""

    unit, loss_label = "tokens", "training loss (cross-entropy)"

    def __init__(self, config: TrainConfig):
        from ..models.text import CharacterText, load_corpus

        self.config = config
        self.text = CharacterText.from_text(*load_corpus())
        self.training, self.held_out = split_text(self.text)
        self.model = GPTConfig(**{**config.gpt.to_json(), "vocab_size": self.text.vocab_size})
        self.corpus, self.items_per_step = self.text.name, config.batch_size * config.gpt.block_size
        self.title = f"{self.model.blocks}-block GPT on {self.corpus}"
        self.loss_fn = next_token_loss

    def pipeline_options(self) -> dict:
        """Return the ``Pipeline`` options of the task's layers: none, they are built with their weights."""
        return {}

    def layers(self) -> list[nn.Module]:
        """Return the GPT's layers: from the seed or ``init_from``'s weights, then N:M sparse when asked.

        Sparsity covers the blocks' linear layers; the embedding and the output head stay dense.
        """
        config = self.config
        layers = gpt_layers(self.model, config.seed)
        if config.init_from is not None:
            weights = load_weights(find_checkpoint(config.init_from))
            nn.Sequential(*layers).load_state_dict(
                {name: weights[name] for name in dense_shapes(self.model)}, strict=False
            )
        if config.sparsity is not None:
            sparsify(
                nn.Sequential(*layers),
                config.sparsity,
                skip=["0", str(len(layers) - 1)],
                sr_ste=config.sparsity_method == "sr-ste",
                kernel=config.sparse_kernel,
            )
        return layers

    def batch(self, generator: torch.Generator):
        """Return one training batch of sequences and their next characters (with ``length_buckets``, a list of
        micro-batches of different lengths and a list of their targets)."""
        config = self.config
        if config.gpt.length_buckets:
            count = config.pipeline.microbatches * config.pipeline.data_parallel
            return bucketed(self.training, config.batch_size // count, count, config.gpt, generator)
        return self.training.batch(config.batch_size, config.gpt.block_size, generator)

    def evaluate(self, pipe) -> float:
        """Return the mean loss of one batch of held-out text, forward only."""
        generator = torch.Generator().manual_seed(self.config.seed + 1)
        pipe.eval()
        inputs, targets = self.held_out.batch(self.config.batch_size, self.config.gpt.block_size, generator)
        return pipe.eval_step(inputs, targets)

    def finish(self, pipe) -> Outcome:
        """Return a sample of generated text."""
        sample = generate(pipe, self.text, self.config)
        return Outcome({"sample": sample}, (), ("", "sample:", sample))


def bucketed(text: CharacterText, rows: int, count: int, model: GPTConfig, generator: torch.Generator):
    """Return ``count`` micro-batches of windows and their targets, each of a length drawn from ``model``'s
    ``length_buckets`` (``block_size · k / buckets``), with ``rows · block_size / length`` rows (at least one): about
    the tokens of ``rows`` full windows each, as length-bucketed batching keeps them."""
    buckets, block = model.length_buckets, model.block_size
    drawn = torch.randint(1, buckets + 1, (count,), generator=generator).tolist()
    inputs, targets = [], []
    for bucket in drawn:
        length = -(-block * bucket // buckets)
        ids, labels = text.batch(max(1, rows * block // length), length, generator)
        inputs.append(ids)
        targets.append(labels)
    return inputs, targets


def split_text(text: CharacterText) -> tuple[CharacterText, CharacterText]:
    """Return the first 95 % of the text for training and the rest, held out, for evaluation."""
    held_out = int(len(text.ids) * 0.95)
    return (
        CharacterText(text.name, text.characters, text.ids[:held_out]),
        CharacterText(text.name, text.characters, text.ids[held_out:]),
    )


def generate(pipe: Pipeline, text: CharacterText, config: TrainConfig) -> str:
    """Return ``config.sample_length`` characters generated by the pipelined model from a short prompt.

    Every rank feeds the same fixed-length window (so the stage shapes stay
    agreed); replica 0's rank of the last stage (``placement.loss_rank``)
    samples the next character and broadcasts it.
    """
    prompt = next((p for p in ("KING HENRY", "ROMEO", "The ") if all(c in text.characters for c in p)), "")
    ids = text.encode(prompt).tolist() or [0]
    generator = torch.Generator().manual_seed(config.seed + 2)
    block_size, source = config.gpt.block_size, pipe.layout.global_rank(pipe.schedule.placement.loss_rank, 0)
    for _ in range(config.sample_length):
        window = ids[-block_size:]
        batch = torch.zeros(config.pipeline.microbatches, block_size, dtype=torch.long)  # one sequence per micro-batch
        batch[:, : len(window)] = torch.tensor(window)
        with torch.no_grad():
            logits = pipe.forward(batch)
        token = torch.zeros(1, dtype=torch.long, device=pipe.device)
        if logits is not None:
            probabilities = torch.softmax(logits[0, len(window) - 1].double().cpu() / 0.8, dim=-1)
            token[0] = int(torch.multinomial(probabilities, 1, generator=generator))
        if dist.get_world_size() > 1:  # every replica computed the same logits
            dist.broadcast(token, src=source)
        ids.append(int(token[0]))
    return text.decode(ids)


class LlamaTask(GPTTask):
    """The GPT demo's text, batches, held-out loss and sample, with a Hugging Face causal LM split by
    ``layerpipe.hf.split``: a small Llama of the ``--llama-*`` sizes, or ``--hf-config``'s model."""

    def __init__(self, config: TrainConfig):
        from ..models.llama import demo_config, describe

        super().__init__(config)
        self.hf_config = demo_config(config.llama, self.text.vocab_size, config.gpt.block_size)
        self.model = Description(describe(self.hf_config, config.llama.hf_config))
        sizes = self.model.sizes
        self.title = f"{sizes['num_hidden_layers']}-layer {sizes['class']} on {self.corpus}"

    def layers(self) -> list[nn.Module]:
        """Return the model's layers: embedding, one per decoder layer, norm and head, initialised from the seed."""
        from ..models.llama import llama_layers

        return llama_layers(self.hf_config)

    def pipeline_options(self) -> dict:
        """Return where the meta-built layers' weights come from: the seed, or ``--init-from``'s folder."""
        return {"seed": self.config.seed, "init_from": self.config.init_from}

    def finish(self, pipe) -> Outcome:
        """Return the GPT demo's sample; write the model's ``config.json`` into the output folder (rank 0), which
        ``layerpipe export`` reads to turn a checkpoint into a ``save_pretrained`` folder."""
        outcome = super().finish(pipe)
        if pipe.global_rank == 0:
            os.makedirs(self.config.output, exist_ok=True)
            partial = os.path.join(self.config.output, "config.json.partial")
            self.hf_config.to_json_file(partial)
            os.replace(partial, os.path.join(self.config.output, "config.json"))
        return outcome


@dataclass(frozen=True)
class Description:
    """A model as a run's summary names it (``to_json``), for a model whose configuration is not a knob class."""

    sizes: dict

    def to_json(self) -> dict:
        """Return the description."""
        return dict(self.sizes)


EVALUATION_CROPS = 96
"""Side of the held-out crops, in pixels, at least (rounded up so that every band has an even number of rows)."""


def evaluation_crop(spatial: int) -> int:
    """Return the side of the held-out crops: ``EVALUATION_CROPS`` rounded up to a multiple of 4 × ``spatial``, so
    that their low-resolution half splits into ``spatial`` bands of an even number of rows."""
    step = 4 * spatial
    return -(-EVALUATION_CROPS // step) * step


class SuperResTask:
    """2× super-resolution of the photographs scikit-image ships, against bicubic enlargement."""

    unit, loss_label = "pixels", "training loss (mean squared error)"

    def __init__(self, config: TrainConfig):
        from ..models.images import HELD_OUT, TRAINING, Photographs

        self.config = config
        self.training, self.held_out = Photographs.load(TRAINING), Photographs.load(HELD_OUT)
        self.model, self.corpus = config.superres, self.training.name
        self.items_per_step = config.batch_size * config.superres.crop**2
        self.title = f"{config.superres.channels}-channel 2× super-resolution on {self.corpus}"
        self.loss_fn = nn.functional.mse_loss
        schedule = config.pipeline
        self.evaluation = self.held_out.centre_crops(
            schedule.microbatches * schedule.data_parallel, evaluation_crop(config.spatial)
        )  # inputs, targets

    def pipeline_options(self) -> dict:
        """Return the ``Pipeline`` options of the task's layers: none, they are built with their weights."""
        return {}

    def layers(self) -> list[nn.Module]:
        """Return the network's layers (spatial ones when the images are split into bands)."""
        from ..models.superres import superres_layers

        return superres_layers(self.config.superres, self.config.seed, spatial=self.config.spatial > 1)

    def batch(self, generator: torch.Generator):
        """Return low-resolution crops and their high-resolution originals."""
        return self.training.batch(self.config.batch_size, self.config.superres.crop, generator)

    def evaluate(self, pipe) -> float:
        """Return the mean squared error on held-out crops, forward only."""
        pipe.eval()
        return pipe.eval_step(*self.evaluation)

    def finish(self, pipe) -> Outcome:
        """Return the held-out PSNR of the model and of bicubic enlargement; draw them side by side (superres.png)."""
        from ..models.images import bicubic, psnr

        inputs, targets = self.evaluation
        with torch.no_grad():
            outputs = pipe.forward(inputs)
        found = None
        if outputs is not None and pipe.replica == 0 and pipe.spatial_index == 0:
            outputs = outputs.float().cpu()
            found = {"psnr": psnr(outputs, targets), "psnr_bicubic": psnr(bicubic(inputs), targets)}
            os.makedirs(self.config.output, exist_ok=True)
            draw_comparison(
                inputs[0],
                bicubic(inputs[:1])[0],
                outputs[0].clamp(0, 1),
                targets[0],
                os.path.join(self.config.output, "superres.png"),
            )
        scores = gathered_first(found)
        gain = scores["psnr"] - scores["psnr_bicubic"]
        return Outcome(
            scores,
            ("superres.png",),
            (
                "",
                f"held-out PSNR: model {scores['psnr']:.2f} dB, bicubic {scores['psnr_bicubic']:.2f} dB "
                f"({gain:+.2f} dB)",
            ),
        )


def draw_comparison(
    low: torch.Tensor, bicubic: torch.Tensor, model: torch.Tensor, truth: torch.Tensor, path: str
) -> None:
    """Draw the low-resolution input, bicubic enlargement, the model's output and the original side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 4, figsize=(12, 3.4))
    for axis, image, title in zip(
        axes, (low, bicubic, model, truth), ("low-resolution input", "bicubic", "model", "original")
    ):
        axis.imshow(image.permute(1, 2, 0).numpy(), interpolation="nearest")
        axis.set_title(title)
        axis.axis("off")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


TASKS = {"gpt": GPTTask, "superres": SuperResTask, "llama": LlamaTask}
"""The demo of each ``--model`` name (``config.MODELS``)."""


def task_for(config: TrainConfig):
    """Return the demo ``config.model`` names."""
    return TASKS[config.model](config)


def gathered_first(value):
    """Return the first non-``None`` of every process's ``value`` (JSON in tensors)."""
    return next((part for part in all_gather_json(value) if part is not None), None)
