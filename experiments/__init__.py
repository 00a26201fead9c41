"""Experiment scripts on the synthetic world (python -m experiments.NAME): the paper's ablation and the measurements docs/experiments.md logs."""
