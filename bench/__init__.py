"""Benchmarks of the sidecar against a naive per-event baseline and Redis's own ceiling.

`python -m bench` runs every case on private servers started for the run (a
`redis-server` on a free loopback port, moto's S3 server in its own process),
prints a table and writes `bench/results/latest.json`. Figures are reported
as ratios to a baseline measured in the same run, since absolute times drift
on shared machines.
"""
