"""Calibration: stream named model inputs through ONNX Runtime and accumulate layer Hessians ``H = Σ xᵀx``.

Modules: ``data`` (calibration files and batches), ``keys`` (which H a layer reads), ``sessions`` (ORT on model
slices), ``stream`` (the accumulation passes), ``memory`` (splitting keys under a memory bound), ``sequential``
(layer groups calibrated in order on quantized inputs); the numpy math is in :mod:`onnxq.stats`.


Each target layer computes ``y = W x`` for rows ``x`` (length ``K``) of its unfolded activation:

* MatMul ``Y = X·B`` and Gemm (transA=0): the rows of ``X`` reshaped to ``[-1, K]``;
* MatMul ``Y = A·X`` (constant ``A``): the columns of ``X[..., K, N']``, i.e. ``X`` moved to ``[-1, K]``;
* Conv (1-D/2-D): the im2col patches, ordered ``(cin, kh, kw)`` like ``W = weight.reshape(Cout, -1)``; conv group
  ``g`` has its own ``H_g`` over its ``Cin/groups·kh·kw`` inputs, so a grouped conv's H is ``[groups, K', K']``.

``H`` is accumulated in float64 (per block of ≤ 2048 rows: float32 BLAS ``syrk``, relative error ~1e-7), one ``H``
per :func:`hessian_key`, so layers that read the same tensor with the same unfolding share it.  Activations live for
at most two batches (ORT computes batch i+1 while batch i is accumulated); under ``max_memory`` the keys are split
into groups, one pass over the data per group.  ORT runs a copy of the model saved with external data in a temp
folder, pruned to the nodes the requested activations need, so models over 2 GB work.
"""
