"""The ``kmlip`` command line: one module per subcommand."""
