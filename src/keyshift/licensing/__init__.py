"""Licensing: accounts, subscriptions, license keys, activations, validation, license files."""
