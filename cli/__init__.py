"""seqr_cli: the `seqr` command line, dispatching to the packages that own each command."""
