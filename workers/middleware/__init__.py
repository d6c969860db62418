"""The worker's middleware: each one job, in Dramatiq's own style.

PoolGuard    refuses to boot threads that could outnumber the connection pools
DrainOnce    a second SIGTERM right after the first is the same request to stop
BusyCount    how many messages the process is on, and has done
Beating      the process's heartbeat in Redis: proven dead, its charges are taken over
FleetMember  joins the fleet's slot accounting at boot, gives its slots back at the end
Reporter     every REPORT_INTERVAL_S: the process's report in Redis (report.py), the
             pool gauges and alerts (pools.py), the breaker and fleet gauges
             (gauges.py); every HEALTH_CHECK_INTERVAL_S, the health checks of one
             process of the fleet (health.py)
"""

from workers.middleware.busy import BusyCount
from workers.middleware.drain import DrainOnce
from workers.middleware.fleet import FleetMember
from workers.middleware.guard import PoolGuard
from workers.middleware.heartbeat import Beating
from workers.middleware.reporter import Reporter

__all__ = ["Beating", "BusyCount", "DrainOnce", "FleetMember", "PoolGuard", "Reporter"]
