"""Pure numpy solvers: a weight ``[N, K]`` (and a Hessian) in, a ``QuantizedWeight`` out."""
