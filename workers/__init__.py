"""What ``dramatiq workers`` (or ``payq worker``) loads: the broker and the charge actor."""

from workers.actors import broker, process_charge

__all__ = ["broker", "process_charge"]
