"""The daemon core: lifecycle, the job pipeline, the session, claiming, settings."""
