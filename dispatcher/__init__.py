"""jobcell: one short-lived, memory-capped container per document."""
