"""Rate limits per account and model (requests and tokens per minute) and per key (concurrency)."""
