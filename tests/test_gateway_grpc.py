"""The gRPC API end to end (real gateway, worker and Redis): through the generated stub, and through
server reflection alone (the way grpcurl calls a server it has no .proto for); health checking."""

from __future__ import annotations

import io
from collections.abc import Iterator

import grpc
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from PIL import Image

from service.gateway.grpc_gen import ldm_pb2 as pb
from service.gateway.grpc_gen import ldm_pb2_grpc as pb_grpc

from .gateway_env import GatewayProcess, tiny_stack
from .workers import wait_for

pytestmark = pytest.mark.slow
MODEL = "tiny"


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    with tiny_stack(tmp_path_factory.mktemp("grpc"), MODEL) as (gateway, _):
        yield gateway


@pytest.fixture
def channel(gateway: GatewayProcess) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(gateway.grpc_target) as channel:
        yield channel


def size(png: bytes) -> tuple[int, int]:
    return Image.open(io.BytesIO(png)).size


def test_generate_answers_the_images(channel: grpc.Channel) -> None:
    reply = pb_grpc.ImagesStub(channel).Generate(
        pb.GenerateRequest(prompt="a red circle", seed=11, n=2), timeout=30
    )
    assert reply.model == MODEL and list(reply.job_ids) == [image.job_id for image in reply.images]
    assert [image.seed for image in reply.images] == [11, 12]
    assert [size(image.png) for image in reply.images] == [(32, 32)] * 2
    assert reply.timings.total_ms >= reply.timings.inference_ms > 0


def test_generate_stream_sends_progress_then_the_images(channel: grpc.Channel) -> None:
    request = pb.GenerateRequest(prompt="a blue square", seed=3, steps=5, width=16, height=16)
    messages = list(pb_grpc.ImagesStub(channel).GenerateStream(request, timeout=30))
    events = [m.job_event for m in messages[:-1]]
    assert all(m.HasField("job_event") for m in messages[:-1]) and messages[-1].HasField("result")
    kinds = [e.type for e in events]
    assert (
        kinds[0] == "queued" and kinds[-1] == "succeeded" and kinds.index("started") < kinds.index("progress")
    )
    assert [e.step for e in events if e.type == "progress"] == [1, 2, 3, 4, 5]
    assert {e.total for e in events if e.type == "progress"} == {5}
    (image,) = messages[-1].result.images
    assert image.seed == 3 and size(image.png) == (16, 16)


def test_job_status_and_cancel(channel: grpc.Channel) -> None:
    stub = pb_grpc.ImagesStub(channel)
    stream = stub.GenerateStream(pb.GenerateRequest(prompt="a long one", steps=150), timeout=30)
    job_id = ""
    for message in stream:
        job_id = message.job_event.job_id
        if message.job_event.type == "progress" and message.job_event.step >= 2:
            break
    job = stub.GetJob(pb.GetJobRequest(id=job_id), timeout=10)
    assert job.status == "running" and job.total == 150 and not job.HasField("queue_position")
    assert stub.CancelJob(pb.CancelJobRequest(id=job_id), timeout=10).status == "cancelled"
    with pytest.raises(grpc.RpcError) as error:
        for _message in stream:
            pass
    assert error.value.code() == grpc.StatusCode.CANCELLED
    done = stub.Generate(pb.GenerateRequest(prompt="x", seed=1), timeout=30)
    job = stub.GetJob(pb.GetJobRequest(id=done.id), timeout=10)
    assert job.status == "succeeded" and job.result.png == done.images[0].png and job.result.seed == 1


def test_list_models_and_health(channel: grpc.Channel) -> None:
    (model,) = pb_grpc.ImagesStub(channel).ListModels(pb.ListModelsRequest(), timeout=10).models
    assert (model.name, model.width, model.size_multiple, model.default_sampler) == (MODEL, 32, 2, "euler")
    wait_for(
        lambda: pb_grpc.ImagesStub(channel).ListModels(pb.ListModelsRequest()).models[0].live_workers, 10, ""
    )
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "ldm.v1.Images"):
        reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


def reflect(
    channel: grpc.Channel, request: reflection_pb2.ServerReflectionRequest
) -> reflection_pb2.ServerReflectionResponse:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    (response,) = list(stub.ServerReflectionInfo(iter([request]), timeout=10))
    return response


def test_reflection_lists_the_services_and_serves_a_callable_descriptor(channel: grpc.Channel) -> None:
    listed = reflect(channel, reflection_pb2.ServerReflectionRequest(list_services=""))
    names = {s.name for s in listed.list_services_response.service}
    assert {"ldm.v1.Images", "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= names
    found = reflect(channel, reflection_pb2.ServerReflectionRequest(file_containing_symbol="ldm.v1.Images"))
    # A pool of its own: only what reflection gave, none of the generated modules' descriptors.
    pool = descriptor_pool.DescriptorPool()
    for raw in found.file_descriptor_response.file_descriptor_proto:
        pool.Add(descriptor_pb2.FileDescriptorProto.FromString(raw))
    method = pool.FindServiceByName("ldm.v1.Images").methods_by_name["Generate"]
    request_class = message_factory.GetMessageClass(method.input_type)
    reply_class = message_factory.GetMessageClass(method.output_type)
    call = channel.unary_unary(
        "/ldm.v1.Images/Generate",
        request_serializer=request_class.SerializeToString,
        response_deserializer=reply_class.FromString,
    )
    reply = call(request_class(prompt="a green circle", seed=21, width=8, height=8), timeout=30)
    (image,) = reply.images
    assert image.seed == 21 and size(image.png) == (8, 8)
