"""Attention variants, one file per family, and the core every path calls.

`core.py` holds the attention formulas; `base.py` the interface every variant
implements; the variant files their own projections and caches. Variants are
registered by name in `mla_jax.registry`.
"""
