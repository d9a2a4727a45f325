"""splitserve.worker."""
