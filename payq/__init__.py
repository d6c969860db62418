"""payq: a worker queue for payment charges.

The core both sides share: settings, database, provider client, broker setup,
logging and the ``payq`` command line. It imports no producer or worker code.
"""

__version__ = "0.1.0"
