"""The one dimension legend of the project, and small shared type aliases.

Notation (used in einsum strings and shape comments everywhere):

    B  batch                     C  segments of a sequence
    T  tokens of a segment       S  key positions (attention keys; S = T for segment attention)
    D  model width               N  query heads
    K  kv heads                  H  head dim (also memory head width D / Nm)
    M  memory slots              F  MLP hidden width
    V  vocabulary                L  layers

A sequence of C*T tokens is cut into C segments of T tokens; the memory bank is [B, M, D] (or
[L, B, M, D] with the `per_block` flow) and is always float32.
"""

from typing import Any

import jax

Array = jax.Array
PyTree = Any
