"""The ``clusterfs`` subcommands that are not libraries of their own: mkfs, status, clone,
the demo."""
