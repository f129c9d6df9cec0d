"""The OpenAI-compatible HTTP front door (`recserve gateway`): chat and text completions over HTTP, served by calling
the first tier's TierService over gRPC.

An adapter, like `recserve.server` and `recserve.client`: it may import `recserve.core` (metrics), the generated
`recserve.v1` messages and, of `recserve.server`, the security helpers (TLS files, bearer tokens) and the typed
option machinery of the settings; never the tier itself. Only the cli imports it.
"""
