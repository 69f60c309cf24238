"""Benchmarks that run on a lab of their own: ``vmferry bench ...``."""
