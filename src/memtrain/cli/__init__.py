"""The ``memtrain`` command line: one module per sub-command group, each with a ``register`` function."""
