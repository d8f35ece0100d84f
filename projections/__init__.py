"""flowledger.projections."""
