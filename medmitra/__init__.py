"""MedMitra Edge: an offline clinical case server."""

__version__ = "0.1.0"
