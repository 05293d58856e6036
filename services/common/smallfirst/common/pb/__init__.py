"""Generated gRPC and protobuf code (scripts/gen_protos.sh). Do not edit."""
