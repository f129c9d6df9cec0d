"""The gRPC adapter over the tier core: servicer, upstream stub, status mapping and the serve loop."""
