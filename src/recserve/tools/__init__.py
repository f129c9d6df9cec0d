"""Operations tools: the demo, load and chaos runs, tiny generated models, development certificates.

Use the core, the policies, the engines, the client and the server's local processes; nothing in the serving path
imports them.
"""
