"""Notifiers: where a routed notification is finally delivered (log, Discord, email)."""
