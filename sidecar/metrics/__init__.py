"""Host, process and application metrics and their exposition."""
