"""Entry points of the experiment suite: `python -m experiments.train ...`."""
