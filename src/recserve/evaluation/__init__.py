"""Research on recorded traces: replaying chains of models through the tier code, frontiers, reports, bounds; and the
progressive quality harness, which judges live answers of OpenAI-compatible servers pairwise.

Uses the core, the policies, the engines, the client and the server's local processes (for `--live` runs); nothing
in the serving path imports it.
"""
