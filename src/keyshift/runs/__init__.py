"""Migration runs: rules x a cohort of accounts, reported, approved and rolled out by
workers (docs/runs.md). ``model`` is pure; ``service`` drives the lifecycle; ``worker``
claims and migrates accounts."""
