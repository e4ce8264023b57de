"""Calibration in one place: ``layerpipe calibrate`` measures the demo on this machine and writes a cost file.

``command`` (no torch: the parser, the launch and the lines printed),
``measure`` (each process: train a few steps, take their timelines, the
bytes per stage and the figures below) and ``probes`` (links, collectives,
core sharing and a stage alone, collective over the world).  The fit of a
measured timeline to a ``CostModel`` stays torch-free in
``layerpipe.sim.calibrate``: train's report and the benchmarks fit their
timelines with it too, and ``sim/`` imports no torch.
"""
