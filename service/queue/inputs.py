"""The input images of an n-image request, stored once for its n jobs.

A request for n images with an init image (a mask, an upscaler's image) is n jobs that draw from the
same images: each job's spec would hold its own copy. Instead the images go once into a hash of their
own (`keys.inputs`, written by the enqueue script with the jobs, with their TTL) and each spec lists
the fields it left there (`"inputs": ["init_image", "mask"]`). The claim script hands the images to
the worker with the spec; the last of the jobs to end deletes them (`settle` in `scripts.py`).

A one-image request keeps its images in its spec, as before. Workers older than this format refuse a
spec that lists `inputs` (an unknown field): the job fails, saying so, rather than running without
its image. Upgrade the workers before the gateways.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence

from ..ldm.request import GenerationRequest

INPUT_FIELDS = ("init_image", "mask", "image")
MARK = "inputs"  # the spec's list of the fields stored apart
REFS = "refs"  # the inputs hash's count of jobs not ended


class InputsGone(ValueError):
    """A job's shared inputs are no longer in Redis (expired): it cannot be drawn."""


def shared_specs(requests: Sequence[GenerationRequest]) -> tuple[list[str], dict[str, bytes]]:
    """The job specs of a request's images and the input images they share, stored apart (none for
    one image, or when nothing is shared)."""
    first = requests[0]
    shared = {f: value for f in INPUT_FIELDS if (value := getattr(first, f)) is not None}
    same = all(getattr(r, f) == value for r in requests[1:] for f, value in shared.items())
    if len(requests) < 2 or not shared or not same:
        return [r.to_json() for r in requests], {}
    fields = sorted(shared)
    specs = []
    for request in requests:
        values = json.loads(request.model_dump_json(exclude_none=True, exclude=set(fields)))
        specs.append(json.dumps({**values, MARK: fields}, separators=(",", ":")))
    return specs, shared


def decode_inputs(reply: Sequence[bytes | str] | Mapping[bytes, bytes]) -> dict[str, bytes]:
    """The inputs hash as HGETALL (a mapping) or the claim script (field, value, ...) gives it, `refs`
    left out."""
    pairs = reply.items() if isinstance(reply, Mapping) else zip(reply[::2], reply[1::2], strict=True)
    out = {}
    for name, value in pairs:
        key = name.decode() if isinstance(name, bytes) else name
        if key != REFS:
            out[key] = value.encode() if isinstance(value, str) else value
    return out


def request_from(
    spec: str | bytes, inputs: Mapping[str, bytes], *, lenient: bool = False
) -> GenerationRequest:
    """The request a job draws: its spec, with the inputs it left apart put back. InputsGone when they
    are missing, unless `lenient` (then they are left out: enough for its seed and prompt)."""
    text = spec.decode() if isinstance(spec, bytes) else spec
    if f'"{MARK}":' not in text:  # a JSON string cannot hold this unescaped: only the key can
        return GenerationRequest.from_json(text)
    values = json.loads(text)
    for field in values.pop(MARK, []):
        if field in inputs:
            values[field] = inputs[field]
        elif not lenient:
            raise InputsGone(f"{field}: the job's input images have expired from the queue")
    return GenerationRequest.model_validate(values)
