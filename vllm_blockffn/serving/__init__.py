"""Serving the model: config and checkpoint checks, the vLLM model and its layers, EAGLE heads."""
