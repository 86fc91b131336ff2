"""Emitters: each turns a QuantizedWeight into nodes and initializers of one output format."""
