"""Benchmarks: scripts that time vzstream stages and print a table plus one JSON line."""
