"""The operators' dashboard (``/ops``), served by ``payq serve`` beside the intake.

``routes`` (the pages and their actions, and ``install``), ``pages`` (templates and
charts), ``signin`` (operator sessions), ``actions`` (single-use confirmation tokens).
"""

from payq.ops.dashboard.routes import install

__all__ = ["install"]
