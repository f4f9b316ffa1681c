"""Benchmarks of the trainer: `python -m bench` (speed against a plain baseline trainer) and
`python -m bench.accuracy` (final binary accuracy of each optimiser on real data)."""
