"""Training a small BlockFFN with the paper's CLS-aware objectives (SPEC.md §6) on one CPU core.

Modules: `data` (corpus, split, tokenizer, batches), `model` (a trainable mirror of
`vllm_blockffn.reference`), `losses` (activation locality, chunk sparsification, the adaptive
λ_CS schedule), `train` (the CLI) and `evaluate` (held-out loss, TLS and CLS-L from a saved
checkpoint through `vllm_blockffn.reference.load_reference`).
"""
