"""Research on recorded traces: replaying chains of models through the tier code, frontiers, reports, bounds.

Uses the core, the policies, the engines, the client and the server's local processes (for `--live` runs); nothing
in the serving path imports it.
"""
