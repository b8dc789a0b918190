"""The command line: the only place that prints and turns errors into exit codes."""
