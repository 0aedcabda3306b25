"""Rigs this repository's tests and benchmarks use, and downstream suites do not.

- `proxy`: a TCP proxy that counts round trips and injects latency (`RoundTripProxy`);
- `secure_server`: a PostgreSQL cluster that accepts only TLS and SCRAM passwords, with
  `certificates` from a CA it generates;
- `wire`: extended-protocol messages sent exactly as given, to see what a pooler makes of them;
- `replica_cluster`: a throwaway primary and a streaming standby of it (`pg_basebackup -R`).

Imported as `tests.rigs.<module>` (the repository root is on `sys.path`: pytest's `pythonpath`
setting, and `python -m benchmarks` run from the root). What downstream suites use (the
plugin, provisioning, PgBouncer) stays in `todo_store.testing`.
"""
