"""Synthetic data at scale (``keyshift simulate``): seeded accounts, and the state checksum that
tells two databases' accounts apart."""
