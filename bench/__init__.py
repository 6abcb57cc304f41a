"""Benchmarks of cnc-monitor on servers they start themselves.

``python -m bench`` runs every benchmark against a private nats-server and
PostgreSQL cluster on free loopback ports, prints a table and writes the
figures as JSON to ``bench/results/<timestamp>.json``. Each figure that has a
ceiling (the same work done by a bare loop with no project code) is also
reported as a ratio to it, measured in the same run on the same servers, so
that the ratio stays meaningful on a busy or slow machine.
"""
