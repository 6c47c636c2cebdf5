"""Worked examples of a user's own model factory and data loader (see README.md)."""
