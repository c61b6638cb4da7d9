"""Operator commands, one module per `audience-sync` subcommand."""
