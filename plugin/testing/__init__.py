"""Tiny models built from configs (random weights, no downloads) for tests, examples and benchmarks.

Not part of the training path: nothing in the library imports this package.
"""
