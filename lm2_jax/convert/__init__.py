"""Hugging Face Llama interop: import a `save_pretrained` directory as LM2 variables, and export back.

    from lm2_jax.convert import load_hf_llama, save_hf_llama
    cfg, variables = load_hf_llama(hf_dir, segment_length=2048)     # a plain Llama (use_memory false)
    save_hf_llama(cfg, variables, out_dir)

Command line: `python -m lm2_jax.convert import|export ...` (see `lm2_jax.convert.__main__`).
"""

from lm2_jax.convert.hf_config import hf_config_from_model, model_config_from_hf
from lm2_jax.convert.llama import copy_tokenizer, hf_key_map, load_hf_llama, save_hf_llama

__all__ = [
    "copy_tokenizer", "hf_config_from_model", "hf_key_map", "load_hf_llama", "model_config_from_hf",
    "save_hf_llama",
]
