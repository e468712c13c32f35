"""Subcommands of the ``nnunet-partial`` CLI, one module each."""
