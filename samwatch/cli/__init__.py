"""The ``samwatch`` command line."""
