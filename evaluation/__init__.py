"""Clients that evaluate a running server (lm-evaluation-harness adapter)."""
