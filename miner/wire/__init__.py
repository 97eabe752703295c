"""The shared leaf: wire shapes, the error tree, receipts and canonical JSON.

Imports nothing of ours; the daemon, the runners and the local coordinator all use it."""
