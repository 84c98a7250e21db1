"""Benchmarks of federated MergeNet against plain references: ``python -m benchmarks``."""
