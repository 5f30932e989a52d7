"""Request context, structured logs and metrics."""
