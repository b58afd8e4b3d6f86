"""Sidecars: the schema (native, samapi, QuPath exports) and the one loader both sides use."""
