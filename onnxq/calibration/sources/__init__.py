"""``onnxq calib``: calibration ``.npz`` files made from a model's own input specs and one source of real data.

Modules: ``specs`` (input kinds, shapes and values that need no data; also verify's generated inputs), ``configs``
(key/value cache sizes from ``genai_config.json``/``config.json``), ``text`` (token windows of a text file),
``images`` (photos resized, cropped and normalised), ``make`` (which input gets what), ``save`` (a byte-identical
``.npz``).
"""
