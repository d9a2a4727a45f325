"""splitserve.protos."""
