"""Secrets: the encryption keyring, the signing keys, API tokens."""
