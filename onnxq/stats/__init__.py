"""Numpy-only statistics of activations: unfolding into rows and Hessian accumulation."""
