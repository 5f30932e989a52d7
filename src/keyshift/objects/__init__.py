"""Account data objects in storage tiers: what counts against a quota, what a downgrade archives."""
