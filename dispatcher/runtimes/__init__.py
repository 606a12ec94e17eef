"""Runtime adapters: each starts one isolated, memory-capped unit per attempt (see dispatcher.ports.Runtime).
What they share is in base.py; each adapter holds only what is its own, and none imports another."""
