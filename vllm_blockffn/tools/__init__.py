"""Tools: the `vllm-blockffn` command line, the demo, tiny test checkpoints, packaging helpers."""
