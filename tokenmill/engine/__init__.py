"""The engine: requests, KV-cache bookkeeping, the scheduler and the step loop."""
