"""splitserve.scheduler."""
