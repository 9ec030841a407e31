"""`tokenmill bench`: workloads, load generation against OpenAI-compatible servers, metrics, reports,
the one-replica recipe and the capacity plan. See docs/bench.md."""
