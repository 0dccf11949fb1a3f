"""Cluster mode: several alertd nodes coordinating through one Redis (store, shared rate
budget, chunk stream, job registry and heartbeats, config fingerprint)."""
