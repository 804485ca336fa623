"""The gRPC front end (`ldm.v1.Images`, grpc.aio), on the HTTP server's event loop, with
`grpc.health.v1` and server reflection. It translates only: validation, limits, auth and the job
flow are `generation.py`'s, and each GatewayError carries its status code (`errors.py`)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc
from google.protobuf.json_format import MessageToDict
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from pydantic import ValidationError

from ..ldm.request import GenerationRequest, RequestError, first_error
from ..queue.states import JobState, Webhook
from .errors import GatewayError, WaitTimeout
from .generation import Gateway, Generated, Submission
from .grpc_gen import ldm_pb2 as pb
from .grpc_gen import ldm_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)
SERVICE = pb.DESCRIPTOR.services_by_name["Images"].full_name  # "ldm.v1.Images"
T = TypeVar("T")
EVENT_TYPES = {"running": "started"}


class ImagesServicer(pb_grpc.ImagesServicer):
    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway

    async def _call(
        self, method: str, context: grpc.aio.ServicerContext, body: Callable[[str], Awaitable[T]]
    ) -> T:
        """Authenticates, runs the body, maps a GatewayError to its status (aborting the call)."""
        code = grpc.StatusCode.OK
        try:
            metadata = dict(context.invocation_metadata() or ())
            return await body(self.gateway.authenticate(_text(metadata.get("authorization"))))
        except GatewayError as e:
            code = e.grpc_code
            if e.job_ids:
                context.set_trailing_metadata((("ldm-job-ids", ",".join(e.job_ids)),))
            await context.abort(code, e.message)
            raise  # abort raises; this is for type checkers
        finally:
            self.gateway.metrics.grpc_requests.labels(method, code.name).inc()

    def _remaining(self, context: grpc.aio.ServicerContext) -> float | None:
        remaining = context.time_remaining()
        return None if remaining is None else max(0.0, remaining - 0.05)

    async def Generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> pb.GenerateReply:
        async def body(owner: str) -> pb.GenerateReply:
            submission = await self._submit(request, owner, context, waiting=True)
            return generate_reply(await self.gateway.wait_for_images(submission, self._remaining(context)))

        return await self._call("Generate", context, body)

    async def GenerateStream(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateEvent]:
        submission = await self._call(
            "GenerateStream", context, lambda owner: self._submit(request, owner, context)
        )
        try:
            async for event in self._events(submission, self._remaining(context)):
                yield pb.GenerateEvent(job_event=event)
            yield pb.GenerateEvent(result=generate_reply(await self.gateway.collect(submission)))
        except GatewayError as e:
            context.set_trailing_metadata((("ldm-job-ids", ",".join(e.job_ids or submission.job_ids)),))
            await context.abort(e.grpc_code, e.message)

    async def _submit(
        self,
        request: pb.GenerateRequest,
        owner: str,
        context: grpc.aio.ServicerContext,
        waiting: bool = False,
    ) -> Submission:
        try:
            internal = generation_request(request)
            webhook = None
            if request.HasField("webhook"):
                events = {"events": list(request.webhook.events)} if request.webhook.events else {}
                webhook = parse_webhook({"url": request.webhook.url, **events})
        except RequestError as e:
            raise self.gateway.invalid(e) from None
        n = request.n if request.HasField("n") else 1
        model = request.model if request.HasField("model") else None
        if model is None and request.image:
            model = self.gateway.default_model_for("upscale")
        key = _text(dict(context.invocation_metadata() or ()).get("idempotency-key")) or ""
        return await self.gateway.submit(
            internal, owner, n=n, model=model, idempotency_key=key, webhook=webhook, waiting=waiting
        )

    async def _events(self, submission: Submission, deadline_s: float | None) -> AsyncIterator[pb.JobEvent]:
        timeout = self.gateway.settings.request_timeout_s
        timeout = timeout if deadline_s is None else min(timeout, deadline_s)
        end = submission.received + timeout
        index = {job_id: i for i, job_id in enumerate(submission.job_ids)}
        events = self.gateway.jobs.waiting.follow(submission.job_ids, idle_s=min(1.0, timeout))
        try:
            async for event in events:
                if time.monotonic() > end:
                    raise WaitTimeout(f"no result within {timeout:g} s; the jobs go on", submission.job_ids)
                if event is None:
                    continue
                f = event.fields
                yield pb.JobEvent(
                    job_id=event.job_id,
                    index=index[event.job_id],
                    type=EVENT_TYPES.get(event.type, event.type),
                    step=int(f.get("step", 0)),
                    total=int(f.get("steps", 0)),
                    error=f.get("error", ""),
                )
        finally:
            await events.aclose()

    async def GetJob(self, request: pb.GetJobRequest, context: grpc.aio.ServicerContext) -> pb.Job:
        async def body(owner: str) -> pb.Job:
            return await self._job(await self.gateway.owned_job(request.id, owner))

        return await self._call("GetJob", context, body)

    async def CancelJob(self, request: pb.CancelJobRequest, context: grpc.aio.ServicerContext) -> pb.Job:
        async def body(owner: str) -> pb.Job:
            await self.gateway.owned_job(request.id, owner)
            await self.gateway.jobs.cancel(request.id)
            return await self._job(await self.gateway.owned_job(request.id, owner))

        return await self._call("CancelJob", context, body)

    async def _job(self, state: JobState) -> pb.Job:
        jobs = self.gateway.jobs
        job = pb.Job(
            id=state.id,
            model=state.model,
            status=str(state.status),
            step=state.step,
            total=state.steps,
            created=state.created,
            error=state.error,
        )
        position = await jobs.queue_position(state)
        if position is not None:
            job.queue_position = position
        if state.started is not None:
            job.started = state.started
        if state.finished is not None:
            job.finished = state.finished
        if (image := await self.gateway.result(state)) is not None:
            job.result.CopyFrom(pb.Image(job_id=image.job_id, seed=image.seed, png=image.png))
        return job

    async def ListModels(
        self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListModelsReply:
        async def body(_owner: str) -> pb.ListModelsReply:
            models = await self.gateway.models()
            return pb.ListModelsReply(
                models=[pb.Model(**{k: v for k, v in m.items() if k != "source"}) for m in models]
            )

        return await self._call("ListModels", context, body)

    async def ListLoras(
        self, request: pb.ListLorasRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListLorasReply:
        return await self._call("ListLoras", context, lambda _owner: _list_loras(self.gateway))


async def _list_loras(gateway: Gateway) -> pb.ListLorasReply:
    loras = await asyncio.to_thread(gateway.lora_list)
    return pb.ListLorasReply(loras=[pb.Lora(**lora) for lora in loras])


def parse_webhook(values: dict[str, Any]) -> Webhook:
    try:
        return Webhook.model_validate(values)
    except ValidationError as e:
        error = first_error(e)
        raise RequestError(f"webhook.{error.field}", error.message) from None


def generation_request(request: pb.GenerateRequest) -> GenerationRequest:
    """The internal request of a GenerateRequest: proto3 optional fields left unset are absent."""
    fields: tuple[str, ...] = ("width", "height", "steps", "guidance_scale", "sampler", "seed", "eta")
    fields += ("strength", "aesthetic_score", "negative_aesthetic_score", "noise_level")
    values: dict[str, object] = {
        field: getattr(request, field) for field in fields if request.HasField(field)
    }
    for field in ("original_size", "crops_coords_top_left", "target_size", "refiner"):
        if request.HasField(field):  # messages: as the request's objects, their unset optionals left out
            message = getattr(request, field)
            values[field] = MessageToDict(
                message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
            )
    loras = [
        {"name": lora.name, **({"weight": lora.weight} if lora.HasField("weight") else {})}
        for lora in request.loras
    ]
    return GenerationRequest.parse(
        {
            "prompt": request.prompt,
            "negative_prompt": request.negative_prompt,
            "init_image": request.init_image or None,
            "mask": request.mask or None,
            "image": request.image or None,
            "loras": loras or None,
            **values,
        }
    )


def generate_reply(generated: Generated) -> pb.GenerateReply:
    return pb.GenerateReply(
        id=generated.id,
        model=generated.model,
        job_ids=generated.job_ids,
        images=[pb.Image(job_id=i.job_id, seed=i.seed, png=i.png) for i in generated.images],
        timings=pb.Timings(**generated.timings),
    )


def _text(value: str | bytes | None) -> str | None:
    return value.decode() if isinstance(value, bytes) else value


async def start_grpc(gateway: Gateway, host: str, port: int) -> tuple[grpc.aio.Server, int]:
    """Starts the server on the running event loop; returns it and the port it is bound to."""
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", gateway.settings.max_body_bytes),
            ("grpc.max_send_message_length", 64 * 1024 * 1024),
        ]
    )
    pb_grpc.add_ImagesServicer_to_server(ImagesServicer(gateway), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = (SERVICE, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME)
    reflection.enable_server_reflection(names, server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if not bound:
        raise RuntimeError(f"gRPC: cannot listen on {host}:{port}")
    await server.start()
    for name in ("", SERVICE):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    log.info("gRPC on %s:%d (%s, health, reflection)", host, bound, SERVICE)
    return server, bound
