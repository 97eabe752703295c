"""The insides of the transformers runner (:mod:`runners.transformers` is the entry point).

``options``, ``memory`` and ``source`` never import torch; ``model``, ``batch`` and
``worker`` do, and are imported only once the runner starts.
"""
