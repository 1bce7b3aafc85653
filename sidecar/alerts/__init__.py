"""The Alertmanager webhook receiver, the durable outbox, routing and the dispatcher."""
