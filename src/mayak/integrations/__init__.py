"""Integrations with business systems: calls out (bot ``call`` steps, plugins) and hooks in."""
