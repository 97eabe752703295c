"""aitbc-miner: the GPU miner worker daemon for the AITBC AI-compute marketplace."""

__version__ = "0.1.0"
