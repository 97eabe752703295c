"""The host and its GPUs: NVML, and the fake NVML for tests."""
