"""Observing the model: sparsity definitions, live counters, `/metrics`, offline analysis."""
