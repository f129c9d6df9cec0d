"""The gRPC adapter over the tier core: servicer, upstream stub, status mapping, security, the serve loop, typed
settings, the `recserve health` command, and local tier processes (for the demo, live evaluation and tests).

Imports the core, the policies and the engines; never the evaluation, the tools or the CLI.
"""
