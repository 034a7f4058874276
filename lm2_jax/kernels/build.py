"""Compiles a kernel's C++ source into a shared library once per machine, and caches it.

The library is built with the host's own compiler (`$CXX`, else `c++`) for the host's CPU
(`-march=native`) against the XLA FFI headers that ship with jaxlib, so nothing is downloaded and no
build step is added to the install. Builds are keyed by everything that shapes the binary (source,
jaxlib version, compiler, CPU model and flags): a cache shared by several machines never hands one a
library built for another. A build writes a temporary file and renames it into place, so concurrent
processes (pytest-xdist workers) never load a half-written library.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import tempfile

import jaxlib

HERE = os.path.dirname(os.path.abspath(__file__))
CACHE_ENV = "LM2_JAX_KERNEL_CACHE"
FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC")


class BuildError(RuntimeError):
  """The kernel could not be compiled on this machine (no compiler, or the compiler failed)."""


def cache_dir() -> str:
  """Where built libraries live: $LM2_JAX_KERNEL_CACHE, else ~/.cache/lm2_jax/kernels."""
  return os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "lm2_jax",
                                                   "kernels")


def _cpu_signature() -> str:
  """The CPU model and feature flags (what -march=native compiles for)."""
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      lines = [ln for ln in f if ln.startswith(("model name", "flags", "Features", "CPU part"))]
    return "".join(sorted(set(lines)))
  except OSError:
    return platform.processor()


def source_digest(source: str) -> str:
  """Hex digest of a kernel source file (part of the library key and of the FFI target names)."""
  with open(os.path.join(HERE, source), "rb") as f:
    return hashlib.sha256(f.read()).hexdigest()


def library(source: str) -> str:
  """Path of the compiled shared library of `source` (a file in this package), building it if needed.

  Raises:
    BuildError: with the compiler's message, when there is no C++ compiler or the build fails.
  """
  compiler = os.environ.get("CXX", "c++")
  if shutil.which(compiler) is None:
    raise BuildError(f"no C++ compiler {compiler!r} on PATH to build lm2_jax/kernels/{source} (install "
                     "g++ or clang, or set CXX)")
  version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=False).stdout
  key = hashlib.sha256("\0".join([source_digest(source), jaxlib.__version__, version,
                                  platform.machine(), _cpu_signature(), *FLAGS]).encode()).hexdigest()
  out_dir = cache_dir()
  path = os.path.join(out_dir, f"{os.path.splitext(source)[0]}-{key[:20]}.so")
  if os.path.exists(path):
    return path
  os.makedirs(out_dir, exist_ok=True)
  include = os.path.join(os.path.dirname(jaxlib.__file__), "include")
  fd, tmp = tempfile.mkstemp(suffix=".so", dir=out_dir)
  os.close(fd)
  cmd = [compiler, *FLAGS, "-isystem", include, os.path.join(HERE, source), "-o", tmp]
  try:
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode:
      raise BuildError(f"building lm2_jax/kernels/{source} failed ({' '.join(cmd)}):\n{done.stderr}")
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return path
