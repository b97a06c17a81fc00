"""Event collection: request bodies, Segment-spec validation and the group-committing log writer."""
