"""Sweeps: run a topology over a grid of its keys, repeatedly, and tabulate and plot the report's metrics.

`spec` reads and checks an experiment file (every grid point validated before anything runs), `runner`
runs each point as a real `emu.run.coordinator.Run` and keeps the results resumable, `output` writes the
CSV, the plots and the Markdown report.  ``emu sweep SPEC.yaml --out DIR`` is these three in order.
"""
