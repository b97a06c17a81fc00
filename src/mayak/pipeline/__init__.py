"""The per-customer pipeline: identity resolution, profiles, merges, and the admin view of customers."""
