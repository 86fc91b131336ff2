"""Passes: graph rewrites (quantize, split) that know nothing of the solvers' math."""
