"""The drills' names, apart: the command line and the runner both need them."""

__all__ = ["DRILLS"]

DRILLS = ("payment_timeout", "database_pool_exhaustion", "connection_error")
