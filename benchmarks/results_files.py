"""Where every benchmark writes its results: ``<folder>/<name>.json`` and ``<folder>/<name>.md``, and its pictures."""

from __future__ import annotations

import argparse
import json
import os


def gloo_machine() -> str:
    """Return how the gloo benchmarks describe where they ran: host, architecture, cores, transport, threads."""
    import platform

    return f"{platform.node()} ({platform.machine()}, {os.cpu_count()} cores), gloo on 127.0.0.1, 1 thread per process"


def write_results(folder: str, name: str, record: dict, lines: list[str]) -> str:
    """Write ``record`` as JSON and ``lines`` as a Markdown table; return the Markdown text."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, f"{name}.json"), "w") as handle:
        json.dump(record, handle, indent=2)
    text = "\n".join(lines) + "\n"
    with open(os.path.join(folder, f"{name}.md"), "w") as handle:
        handle.write(text)
    return text


def save_figure(figure, path: str) -> None:
    """Lay out and write a matplotlib ``figure`` to ``path`` (its folder made if missing), then close it."""
    import matplotlib.pyplot as plt

    figure.tight_layout()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)


def repeated_benchmark_arguments(description: str, quick: str, repeats: int = 15) -> argparse.Namespace:
    """Return the options every timing benchmark takes: ``--repeats``, ``--quick`` (what it shrinks) and ``--output``."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=repeats, help="interleaved repetitions of every variant")
    parser.add_argument("--quick", action="store_true", help=quick)
    parser.add_argument("--output", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    return parser.parse_args()
