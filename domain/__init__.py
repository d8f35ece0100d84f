"""flowledger.domain."""
