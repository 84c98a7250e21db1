"""Experiments: teacher pretraining, the central baselines, federated runs and the suite."""
