"""The model floor: everything that touches a model's weights, importing nothing else of the project.

- `loading`: presets (GPT-2 or Llama architecture) and loaders for any HF causal LM or sequence classifier (what
  `rewards/` and `agents/` load through);
- `lean`: the lean paths (`LeanForward` for scoring and training, `LeanDecoder` for sampling) over an
  architecture's trunk: `gpt2` (GPT-2) and `llama` (Llama, Qwen2/3, Mistral); `decoding.make_decoder` picks the
  lean decoder or the HF forward;
- `onednn`: the oneDNN linears those paths multiply with;
- `tokens`: positions under padding, padded batches, log-probs at a temperature (the fused log-softmax);
- `runtime`: the process-wide switches (bf16 where it is faster, glibc's malloc keeping freed memory).

`rewards/` stands on this floor, `textenv`'s envs on `rewards/`, and `agents/` on all of them
(tests/test_layers.py keeps it so).
"""

from textenv.models.loading import (
                                    ARCHS,
                                    PRESETS,
                                    build_model,
                                    disable_dropout,
                                    fuse_gelu,
                                    load_causal_lm,
                                    load_sequence_classifier,
                                    preset_config,
)
from textenv.models.runtime import bf16_is_fast, keep_freed_memory

__all__ = ["ARCHS", "PRESETS", "bf16_is_fast", "build_model", "disable_dropout", "fuse_gelu", "keep_freed_memory",
           "load_causal_lm", "load_sequence_classifier", "preset_config"]
