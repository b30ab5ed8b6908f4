"""CLI commands, one module per stage, each exposing `register(app)`."""
