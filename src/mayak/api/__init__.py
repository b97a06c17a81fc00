"""The HTTP interface: Segment-compatible ingestion, the admin API and operations endpoints."""
