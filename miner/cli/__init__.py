"""The ``aitbc-miner`` command line."""
