"""Durable outcomes: the outbox on disk and its one writer thread."""
