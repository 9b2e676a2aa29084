"""Benchmarks of the coordinator, side by side with a hand-written redis-py loop, FastStream
and taskiq-redis (the ``bench`` extra: ``pip install -e '.[bench]'``).

Run ``python -m benchmarks`` (``--quick`` for a short run, ``--only throughput,latency`` for
some sections). Sections: throughput (engine, node process, peers; 200 B and 8 KB), latency at
1,000 msg/s, request/reply, failover, scale (nodes and agents) and node memory. Results are
written as JSON under ``benchmarks/results/`` and summarised as markdown tables on stdout.
They are never part of the test suite.
"""
