"""The tokenrelay gRPC server: servicers, conversion, errors, admission, health, lifecycle."""
