"""Customer notices: an outbox written with the change it announces, delivered as signed
webhooks (Standard Webhooks) with retries, a dead-letter list and replay (docs/notices.md)."""
