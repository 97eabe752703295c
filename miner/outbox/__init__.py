"""Durable outcomes: the outbox on disk and delivery to the coordinator."""
