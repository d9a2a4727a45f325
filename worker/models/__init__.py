"""splitserve.worker.models."""
