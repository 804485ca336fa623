"""The gateway: HTTP (FastAPI) and gRPC in front of the Redis job queue; it never imports torch.

| module | what |
|---|---|
| `app.py` | `create_app(settings)`: middleware, error handlers, routers; the lifespan starts gRPC |
| `routes_images.py`, `routes_jobs.py`, `routes_meta.py` | the native HTTP routes |
| `schemas.py` | native HTTP bodies, one schema per direction |
| `openai_api.py`, `openai_schemas.py` | OpenAI's Images API (`/v1/images/...`), its error shape |
| `a1111_api.py`, `a1111_schemas.py` | AUTOMATIC1111's web UI API (`/sdapi/v1/...`), its error shapes |
| `shaped.py`, `uploads.py`, `signed_urls.py` | what the two share: error shapes, uploaded images, links |
| `grpc_server.py`, `grpc_gen/` | the gRPC service (`proto/ldm/v1/ldm.proto`) and its generated stubs |
| `generation.py` | what every front end does: validate, enqueue n jobs, wait, collect |
| `catalog.py` | models' sizes and defaults from their safetensors headers |
| `job_service.py` | the job protocol for asyncio (XREAD BLOCK on the jobs' event streams), each key's jobs |
| `auth.py`, `errors.py`, `metrics.py`, `middleware.py`, `deps.py`, `serve.py` | the rest |
"""
