"""π-constrained architecture search (NCAS): candidate widths, the reconstructed π-constraints, completion
of an architecture from its width, capacity / hardware / proxy scores and the Pareto front.

    python -m diffmoe_jax.ncas --config=configs/ncas.py --workdir=runs/ncas
"""
