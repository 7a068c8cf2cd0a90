"""The ``t2i`` command line: ``t2i <command> --help`` for each command."""
