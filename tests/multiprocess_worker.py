"""`python -m diffmoe_jax.main` with the distributed hook at its top: one process of a multi-process test run.

    python tests/multiprocess_worker.py --config=... --workdir=... --coordinator_address=127.0.0.1:PORT \
        --num_processes=2 --process_id=I
"""
from absl import app

from diffmoe_jax import distributed
from diffmoe_jax import main as main_lib


def _main(argv):
  distributed.initialize_from_flags()
  main_lib.main(argv)


if __name__ == "__main__":
  app.run(_main)
