"""payq: a worker queue for payment charges.

The core every side shares: settings, the schema and database, the broker and
Dramatiq's Redis layout, the provider endpoints (``endpoints``, ``routing``: a client
and a ``gate`` each; ``failover``), one attempt at a charge (``processing``), the ledger
and the sweep, health and figures,
logging and metrics. It imports nothing above it: no producer, worker, operator tool
(``payq.ops``), simulator, dev tooling or the ``payq`` command (``payq_cli``);
``tests/test_layering.py`` holds it to that.
"""

__version__ = "0.1.0"
