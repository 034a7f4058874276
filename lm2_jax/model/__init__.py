"""The LM2 model: config, backbone, memory, segment recurrence, layouts and FLOP counts."""

from lm2_jax.model.config import ModelConfig
from lm2_jax.model.flops import forward_flops_per_token, model_flops_per_token
from lm2_jax.model.layout import stack_layers, unstack_layers
from lm2_jax.model.lm2 import LM2, LossStats
from lm2_jax.model.memory import init_memory

__all__ = [
    "LM2", "LossStats", "ModelConfig", "forward_flops_per_token", "init_memory",
    "model_flops_per_token", "stack_layers", "unstack_layers",
]
