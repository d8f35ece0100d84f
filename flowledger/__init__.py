"""flowledger: a durable, event-sourced workflow engine for multi-step agent workflows."""

__version__ = "0.1.0"
