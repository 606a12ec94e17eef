"""The job that runs inside each memory-capped container. Self-contained: it does not import the dispatcher."""
