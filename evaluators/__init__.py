"""Benchmarks on frozen features: k-NN, linear probe, dense tasks, retrieval."""
