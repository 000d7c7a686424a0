"""The front door: HTTP (KServe v2, ``/ai/run`` with batches, OpenAI-compatible ``/v1``,
OpenAPI, metrics) and gRPC, with their bearer tokens and connection limits.

- ``app``: the ASGI application and its routing;
- ``openai_api``: the ``/v1`` routes; ``openapi``: ``/openapi.json``; ``sse``: server-sent events;
- ``grpc_service``: KServe v2 over gRPC;
- ``tokens``: who may call what; ``connection``: limits on what a client can hold;
- ``input_check``: an ``/ai/run`` body checked against the model's schema before a cold start.

It knows models by name, through the scheduler's per-model handles.
"""
