"""Test-wide settings: 8 fake CPU devices for sharding tests, strict rank promotion, parsed absl flags.

XLA_FLAGS must be set before jax initialises its backend, so this runs before any test module imports jax.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import absl.flags  # noqa: E402
import jax  # noqa: E402

# Grain worker processes read absl flags; tests never parse a command line.
absl.flags.FLAGS.mark_as_parsed()
jax.config.update("jax_numpy_rank_promotion", "raise")
