"""RecServe: recursive LLM offloading across device, edge and cloud tiers over gRPC."""

__version__ = "0.1.0"
