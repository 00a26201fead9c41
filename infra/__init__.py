"""Scaffolding of training and the command lines: dataclass flags, checkpoints, distribution, model surgery."""
