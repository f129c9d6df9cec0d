"""Clients of a tier stack: trace questions as requests, sent in process or over gRPC, graded and tallied.

May import the core, the policies, the engines and the generated stubs; used by the evaluation and the tools,
never by the serving path.
"""
