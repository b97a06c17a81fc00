"""Mayak: a self-hosted connected customer-experience platform."""

__version__ = "0.1.0.dev0"
