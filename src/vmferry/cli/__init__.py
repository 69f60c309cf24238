"""The ``vmferry`` command line: a client of the controller's API, plus the lab and daemons."""
