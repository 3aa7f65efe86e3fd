"""Shared helpers: configuration, logging, data files and I/O."""
