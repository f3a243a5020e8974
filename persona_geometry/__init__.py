"""persona-geometry."""
