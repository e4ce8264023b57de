"""layerpipe: pipeline-parallel training for PyTorch, built around the breadth-first schedule.

``layerpipe.Pipeline``, ``layerpipe.launch``, ``layerpipe.save_checkpoint`` and
``layerpipe.load_checkpoint`` import torch when first used,
so the schedule engine and simulator (``layerpipe.schedule``, ``layerpipe.sim``)
stay importable without it.
"""

__version__ = "0.1.0"

_LAZY = {
    "Pipeline": ("layerpipe.runtime.pipeline", "Pipeline"),
    "launch": ("layerpipe.runtime.launch", "launch"),
    "LaunchError": ("layerpipe.runtime.launch", "LaunchError"),
    "PipelineError": ("layerpipe.runtime.stage", "PipelineError"),
    "ScheduleConfig": ("layerpipe.schedule.config", "ScheduleConfig"),
    "ConfigError": ("layerpipe.knobs", "ConfigError"),
    "save_checkpoint": ("layerpipe.runtime.checkpoint", "save_checkpoint"),
    "load_checkpoint": ("layerpipe.runtime.checkpoint", "load_checkpoint"),
    "materialise": ("layerpipe.runtime.materialise", "materialise"),
    "register_overlap": ("layerpipe.runtime.overlap", "register_overlap"),
    "OverlapError": ("layerpipe.runtime.overlap", "OverlapError"),
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        module, attribute = _LAZY[name]
        return getattr(importlib.import_module(module), attribute)
    raise AttributeError(f"module 'layerpipe' has no attribute {name!r}")


__all__ = list(_LAZY)
