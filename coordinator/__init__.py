"""The local AITBC coordinator: the published Coordinator API plus the miner endpoints.

``coordinator.app.create_app`` builds the FastAPI app; ``coordinator.server`` runs it
(``aitbc-miner coordinator``); ``coordinator.client.Client`` is the small Python client.
"""
