"""The gRPC server: lifecycle (app), RPC handlers (servicer, agent_step), admission, errors."""
