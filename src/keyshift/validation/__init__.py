"""Validation: the pure decision, its reads, the cache it answers from, offline license files."""
