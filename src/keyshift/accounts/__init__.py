"""Accounts: accounts, subscriptions, add-ons and preferences."""
