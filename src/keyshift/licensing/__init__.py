"""Licensing: license keys, licenses and activations. Accounts are in ``keyshift.accounts``;
validation and offline license files in ``keyshift.validation``."""
