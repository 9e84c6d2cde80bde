"""Chat gateway."""
