"""The gateway: HTTP (FastAPI) and gRPC in front of the Redis job queue; it never imports torch.

| module | what |
|---|---|
| `app.py` | `create_app(settings)`: middleware, error handlers, routers; the lifespan starts gRPC |
| `routes_images.py`, `routes_jobs.py`, `routes_meta.py` | the HTTP routes |
| `schemas.py` | HTTP bodies, one schema per direction |
| `grpc_server.py`, `grpc_gen/` | the gRPC service (`proto/ldm/v1/ldm.proto`) and its generated stubs |
| `generation.py` | what both front ends do: validate, enqueue n jobs, wait, collect |
| `validation.py` | limits and the model's constraints, before anything is enqueued |
| `catalog.py` | models' sizes and defaults from their safetensors headers |
| `jobs.py` | the job protocol for asyncio (XREAD BLOCK on the jobs' event streams) |
| `auth.py`, `errors.py`, `metrics.py`, `middleware.py`, `deps.py`, `serve.py` | the rest |
"""
