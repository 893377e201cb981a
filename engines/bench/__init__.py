"""Benchmarks: spawned workers driven in interleaved rounds (``workers``), the all-backends
report (``report``) and its rendering (``render``), and the machine's measured peak (``peak``)."""
