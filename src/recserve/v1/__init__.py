"""Generated protobuf messages and gRPC stubs of proto/recserve/v1 (`make proto`); the core imports the messages only."""
