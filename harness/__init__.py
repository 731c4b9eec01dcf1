"""Orchestration, measurement and I/O around the pure ``decoders`` package."""

__version__ = "0.1.0"
