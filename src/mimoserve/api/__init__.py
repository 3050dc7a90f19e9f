"""Thin HTTP routers: resolve dependencies, call one service method, choose JSON or SSE."""
