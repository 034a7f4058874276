"""Test-wide settings: 8 fake CPU devices for sharding tests, strict rank promotion, parsed absl flags.

XLA_FLAGS must be set before jax initialises its backend, so this runs before any test module imports jax.
"""

import os
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import absl.flags  # noqa: E402
import jax  # noqa: E402

# Grain worker processes read absl flags; tests never parse a command line.
absl.flags.FLAGS.mark_as_parsed()
jax.config.update("jax_numpy_rank_promotion", "raise")
# Many tests compile the same tiny programs (each train() call jits anew); a persistent compilation
# cache shared by the xdist workers compiles each of them once per suite run.
jax.config.update("jax_compilation_cache_dir",
                  os.path.join(tempfile.gettempdir(), f"lm2_jax_test_cache_{os.getuid()}"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
