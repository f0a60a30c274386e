"""`make bench`: the Sonos token service's performance figures against their targets (docs/benchmarks.md)."""
