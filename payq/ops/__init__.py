"""Operator tools: the demo now; dead-letter draining, health and status to come."""
