"""Workspaces, API keys and signing secrets."""
