"""The engine: components built from a config, the training loop, evaluation, resume.

Imports ``results``, ``algorithms``, ``models`` and ``data``; only ``cli`` imports it.
"""
