"""Hugging Face transformers integration (the `[hf]` extra).

Importing this module registers model_type "retnet_exact" with AutoConfig and
AutoModelForCausalLM, a side effect like that of `retnet.eval.harness` (which registers the
lm-eval model "retnet"); no other import has one. Exported folders also
carry their own code, so they load without retnet through `trust_remote_code=True`.

    import retnet.hf
    model = AutoModelForCausalLM.from_pretrained("exported/")
"""

from __future__ import annotations

from transformers import AutoConfig, AutoModelForCausalLM

from retnet.hf.configuration import MODEL_TYPE, RetNetHFConfig
from retnet.hf.export import export_checkpoint, export_model, hf_tokenizer, save_hf_tokenizer
from retnet.hf.modeling import RetNetForCausalLM, StateCache

AutoConfig.register(MODEL_TYPE, RetNetHFConfig, exist_ok=True)
AutoModelForCausalLM.register(RetNetHFConfig, RetNetForCausalLM, exist_ok=True)

__all__ = ["MODEL_TYPE", "RetNetForCausalLM", "RetNetHFConfig", "StateCache",
           "export_checkpoint", "export_model", "hf_tokenizer", "save_hf_tokenizer"]
