"""The wire transport: the gRPC cohort service (server, servicer, auth, status) and its client; generated code in ``generated/``."""
