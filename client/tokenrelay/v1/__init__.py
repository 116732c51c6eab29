"""Generated tokenrelay.v1 stubs (python scripts/gen_protos.py); do not edit the *_pb2* files."""
