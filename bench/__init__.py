"""`make bench`: ours next to a baseline, every row measured in one run (docs/performance.md)."""
