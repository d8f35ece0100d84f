"""flowledger.adapters."""
