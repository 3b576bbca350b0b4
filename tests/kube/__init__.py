"""Operator tests: kopf for real against an in-memory Kubernetes API on loopback."""
