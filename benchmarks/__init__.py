"""Benchmarks for todo_store: round trips, peers, scaling. Run `python -m benchmarks`.

Benchmarks are not tests: they measure and report (in `benchmarks/results.md`), they assert
nothing. The deterministic round-trip counts are asserted in `tests/test_round_trips.py`.
"""
