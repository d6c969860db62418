"""``make bench``: payq side by side with a plain Dramatiq actor and a plain Celery task.

``python -m benchmarks.run`` runs it and writes ``benchmarks/results.md``; the
baselines are ``plain_dramatiq`` and ``plain_celery``. Not tests: nothing fails on a
figure.
"""
