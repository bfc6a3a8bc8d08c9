"""Sweep grids: each file defines `get_sweep(arg=None)` -> a list of trials for experiments.sweep."""
