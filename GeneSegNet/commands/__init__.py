"""Command-line entry points that live inside the package (console scripts)."""
