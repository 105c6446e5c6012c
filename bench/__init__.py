"""Benchmarks: `python -m bench.run` from the repository's root (see docs/performance.md).

run.py is the command line; scenarios/ holds one module per scenario,
named for what it measures; harness.py the statistics and interleaving;
report.py the table and JSON; testbed.py the simulated node they run on;
agent.py (with agent_client.py, its host side) the process spawner in its
own mount namespace, and minifuse.py the FUSE responder it uses.
"""
