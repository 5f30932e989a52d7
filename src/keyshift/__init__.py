"""keyshift: a license server and edition-migration engine."""

__version__ = "0.1.0"
