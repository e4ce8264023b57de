"""The runtime: partitioning, local launching, the executor and the ``Pipeline`` API (imports torch)."""
