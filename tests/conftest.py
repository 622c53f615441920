"""Test-wide setup: eight simulated CPU devices (so sharding is tested in-process) before jax is imported."""
import atexit
import importlib.metadata
import os
import shutil
import tempfile

# Tests run tiny programs whose cost is compilation: XLA:CPU's backend optimisation level 0 compiles
# several times faster (at half the run speed, which tests do not notice), and its element-wise fusion
# emitters in place of the MLIR ones about twice as fast again (tests/train_config.py's train step: 5.2 s
# to 2.8 s, running 6% slower). An XLA_FLAGS flag that XLA does not know aborts the process, and a later
# XLA may drop that one: it is set only for the jaxlib it was measured on.
_fast_compile = " --xla_backend_optimization_level=0"
if importlib.metadata.version("jaxlib").startswith("0.10."):
  _fast_compile += " --xla_cpu_use_fusion_emitters=false"
# The flags given to pytest, less those set here (pytest-xdist's workers inherit them from the main process).
_user_flags = " ".join(flag for flag in os.environ.get("XLA_FLAGS", "").split()
                       if not flag.startswith("--xla_force_host_platform_device_count=")
                       and flag not in _fast_compile.split())


def subprocess_xla_flags(devices: int) -> str:
  """XLA_FLAGS for a JAX subprocess that simulates `devices` CPU devices, with the compile flags above."""
  count = f" --xla_force_host_platform_device_count={devices}" if devices > 1 else ""
  return (_user_flags + count + _fast_compile).strip()


os.environ["XLA_FLAGS"] = subprocess_xla_flags(8)
# JAX_PLATFORMS=cuda (or tpu) runs the single-device tests on an accelerator, e.g. the kernels' reference tests:
# `JAX_PLATFORMS=cuda pytest tests/test_flash_attention.py -k "pallas and not pallas_tpu"`.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent compilation cache for the session, shared with the trainer subprocesses tests start and
# with pytest-xdist's workers (they inherit the environment), so a program compiled once (same model, same
# shapes) is not compiled again. The process that makes the directory removes it.
_SESSION_DIR = os.environ.get("DIFFMOE_TEST_SESSION_DIR")
if not _SESSION_DIR:
  _SESSION_DIR = os.environ["DIFFMOE_TEST_SESSION_DIR"] = tempfile.mkdtemp(prefix="diffmoe_tests_")
  atexit.register(shutil.rmtree, _SESSION_DIR, ignore_errors=True)
os.environ["JAX_COMPILATION_CACHE_DIR"] = os.path.join(_SESSION_DIR, "xla")
# Every program goes to that cache, not only those compiling for over a second (JAX's default): a trainer
# subprocess then also skips its dozens of small ones (22 s instead of 25 s for one step of the test config).
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
# The token cache of the built-in corpus, built once per session.
os.environ["DIFFMOE_CACHE"] = os.path.join(_SESSION_DIR, "tokens")
# Set by the environment, not jax.config, so that the trainer subprocesses compile the same programs as the
# tests in this process (the precision is part of the cache key) and find them in the cache.
os.environ["JAX_DEFAULT_MATMUL_PRECISION"] = "highest"

import jax  # noqa: E402  (must follow the XLA_FLAGS above)

# Start the backend now: it reads XLA_FLAGS when first used, and a test that sets them for a subprocess
# (the notebook's kernel) must not leave an in-process backend started after it with one device.
assert jax.default_backend() != "cpu" or jax.device_count() == 8

import pytest  # noqa: E402

from diffmoe_jax import config as config_lib  # noqa: E402


def small_model_config(**model_overrides):
  """A full config whose model keeps the paper's shape at test size (compiles in seconds)."""
  c = config_lib.defaults()
  c.name = "test"
  c.model.update(vocab_size=64, d_model=48, num_layers=4, num_heads=2, head_dim=24, max_seq_len=16,
                 dtype="float32", init_std=0.2)
  c.model.moe.update(num_experts=4, expert_ffn_dim=64, top_k=2)
  c.model.mod.update(capacity=0.5, predictor_hidden=8)
  for key, value in model_overrides.items():
    node = c.model
    *path, leaf = key.split(".")
    for part in path:
      node = node[part]
    node[leaf] = value
  return c


@pytest.fixture(scope="session")
def make_config():
  return small_model_config
