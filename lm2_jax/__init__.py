"""lm2_jax: LM2 (Large Memory Models, arXiv 2502.06049) in JAX/Flax.

Subpackages: `model` (backbone, memory, segment recurrence), `data` (tokenizers, bAbI, BABILong,
corpora, Grain pipelines), `train` (mesh, optimizer, checkpoints, loop), `eval` (QA, perplexity,
generation, plots). The dimension legend every module uses lives in `lm2_jax.typing`.
"""
