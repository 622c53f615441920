"""diffmoe_jax: differential attention, mixture-of-experts and mixture-of-depths language models in JAX."""
import sys

if sys.argv[:1] == ["-m"]:  # run as a command, `python -m diffmoe_jax.<command>`, which imports JAX first (seconds)
  from diffmoe_jax import cli as _cli
  _cli.defer_interrupts_while_importing()
