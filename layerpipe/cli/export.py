"""``layerpipe export``: write a layerpipe checkpoint of a Hugging Face model as a folder ``transformers`` loads."""

from __future__ import annotations

import argparse

from .common import wrote


def add_parser(commands) -> None:
    """Add ``export`` to the subcommands."""
    parser = commands.add_parser(
        "export",
        help="write a checkpoint of a Hugging Face model as a save_pretrained folder",
        description="Write the weights of a layerpipe checkpoint of layers made by layerpipe.hf.split as a folder "
        "written as save_pretrained writes it (config.json and model.safetensors), which "
        "transformers.AutoModelForCausalLM.from_pretrained loads. The model is built from --config on the meta "
        "device, for its names only.",
    )
    parser.add_argument("checkpoint", help="a checkpoint's step folder, or a run's output folder (its latest step)")
    parser.add_argument(
        "--config",
        required=True,
        metavar="CONFIG",
        help="the model's Hugging Face config.json, or a folder holding one",
    )
    parser.add_argument("--output", required=True, metavar="DIR", help="the folder to write (created if missing)")
    parser.add_argument(
        "--untie", action="store_true", help="the layers were split with untie=True (the head holds its own copy)"
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    """Export the checkpoint; refuses, in one line, a config or checkpoint that does not fit."""
    import transformers

    from ..hf_export import build_on_meta, export
    from ..knobs import ConfigError

    transformers.logging.set_verbosity_error()  # its advice on building a class is not for a one-line command
    try:
        model = build_on_meta(args.config)
        wrote(export(args.checkpoint, model, args.output, untie=args.untie))
    except ConfigError:
        raise
    except ValueError as error:  # transformers' unknown model type, split's uncovered class or tied head
        raise ConfigError("config", args.config, str(error).splitlines()[0] if str(error) else "not usable") from None
