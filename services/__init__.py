"""flowledger.services."""
