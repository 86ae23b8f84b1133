"""HTTP API, streaming, metrics and command-line entry points."""
