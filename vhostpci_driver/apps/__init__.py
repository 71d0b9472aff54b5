"""Applications built only on the public API: backends for frontend device types."""
