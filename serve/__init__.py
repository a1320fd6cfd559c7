"""The gRPC face of jattn: the only package that knows gRPC."""
