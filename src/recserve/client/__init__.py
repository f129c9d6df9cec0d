"""Clients of a tier stack: trace questions as requests, sent in process or over gRPC, graded and tallied.

Imports the core and the generated stubs; used by the evaluation and the tools, never by the serving path.
"""
