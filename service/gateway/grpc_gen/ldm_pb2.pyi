from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GenerateRequest(_message.Message):
    __slots__ = ("prompt", "negative_prompt", "width", "height", "steps", "guidance_scale", "sampler", "seed", "n", "model", "eta", "init_image", "strength", "mask", "loras", "webhook", "original_size", "crops_coords_top_left", "target_size", "aesthetic_score", "negative_aesthetic_score", "refiner", "image", "noise_level")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    NEGATIVE_PROMPT_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    GUIDANCE_SCALE_FIELD_NUMBER: _ClassVar[int]
    SAMPLER_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    N_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    ETA_FIELD_NUMBER: _ClassVar[int]
    INIT_IMAGE_FIELD_NUMBER: _ClassVar[int]
    STRENGTH_FIELD_NUMBER: _ClassVar[int]
    MASK_FIELD_NUMBER: _ClassVar[int]
    LORAS_FIELD_NUMBER: _ClassVar[int]
    WEBHOOK_FIELD_NUMBER: _ClassVar[int]
    ORIGINAL_SIZE_FIELD_NUMBER: _ClassVar[int]
    CROPS_COORDS_TOP_LEFT_FIELD_NUMBER: _ClassVar[int]
    TARGET_SIZE_FIELD_NUMBER: _ClassVar[int]
    AESTHETIC_SCORE_FIELD_NUMBER: _ClassVar[int]
    NEGATIVE_AESTHETIC_SCORE_FIELD_NUMBER: _ClassVar[int]
    REFINER_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    NOISE_LEVEL_FIELD_NUMBER: _ClassVar[int]
    prompt: str
    negative_prompt: str
    width: int
    height: int
    steps: int
    guidance_scale: float
    sampler: str
    seed: int
    n: int
    model: str
    eta: float
    init_image: bytes
    strength: float
    mask: bytes
    loras: _containers.RepeatedCompositeFieldContainer[LoraRef]
    webhook: Webhook
    original_size: Size
    crops_coords_top_left: Point
    target_size: Size
    aesthetic_score: float
    negative_aesthetic_score: float
    refiner: Refiner
    image: bytes
    noise_level: int
    def __init__(self, prompt: _Optional[str] = ..., negative_prompt: _Optional[str] = ..., width: _Optional[int] = ..., height: _Optional[int] = ..., steps: _Optional[int] = ..., guidance_scale: _Optional[float] = ..., sampler: _Optional[str] = ..., seed: _Optional[int] = ..., n: _Optional[int] = ..., model: _Optional[str] = ..., eta: _Optional[float] = ..., init_image: _Optional[bytes] = ..., strength: _Optional[float] = ..., mask: _Optional[bytes] = ..., loras: _Optional[_Iterable[_Union[LoraRef, _Mapping]]] = ..., webhook: _Optional[_Union[Webhook, _Mapping]] = ..., original_size: _Optional[_Union[Size, _Mapping]] = ..., crops_coords_top_left: _Optional[_Union[Point, _Mapping]] = ..., target_size: _Optional[_Union[Size, _Mapping]] = ..., aesthetic_score: _Optional[float] = ..., negative_aesthetic_score: _Optional[float] = ..., refiner: _Optional[_Union[Refiner, _Mapping]] = ..., image: _Optional[bytes] = ..., noise_level: _Optional[int] = ...) -> None: ...

class Webhook(_message.Message):
    __slots__ = ("url", "events")
    URL_FIELD_NUMBER: _ClassVar[int]
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    url: str
    events: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, url: _Optional[str] = ..., events: _Optional[_Iterable[str]] = ...) -> None: ...

class Size(_message.Message):
    __slots__ = ("width", "height")
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    width: int
    height: int
    def __init__(self, width: _Optional[int] = ..., height: _Optional[int] = ...) -> None: ...

class Point(_message.Message):
    __slots__ = ("x", "y")
    X_FIELD_NUMBER: _ClassVar[int]
    Y_FIELD_NUMBER: _ClassVar[int]
    x: int
    y: int
    def __init__(self, x: _Optional[int] = ..., y: _Optional[int] = ...) -> None: ...

class Refiner(_message.Message):
    __slots__ = ("model", "switch_at")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    SWITCH_AT_FIELD_NUMBER: _ClassVar[int]
    model: str
    switch_at: float
    def __init__(self, model: _Optional[str] = ..., switch_at: _Optional[float] = ...) -> None: ...

class LoraRef(_message.Message):
    __slots__ = ("name", "weight")
    NAME_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    name: str
    weight: float
    def __init__(self, name: _Optional[str] = ..., weight: _Optional[float] = ...) -> None: ...

class Image(_message.Message):
    __slots__ = ("job_id", "seed", "png")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    PNG_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    seed: int
    png: bytes
    def __init__(self, job_id: _Optional[str] = ..., seed: _Optional[int] = ..., png: _Optional[bytes] = ...) -> None: ...

class Timings(_message.Message):
    __slots__ = ("queue_ms", "inference_ms", "total_ms")
    QUEUE_MS_FIELD_NUMBER: _ClassVar[int]
    INFERENCE_MS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_MS_FIELD_NUMBER: _ClassVar[int]
    queue_ms: float
    inference_ms: float
    total_ms: float
    def __init__(self, queue_ms: _Optional[float] = ..., inference_ms: _Optional[float] = ..., total_ms: _Optional[float] = ...) -> None: ...

class GenerateReply(_message.Message):
    __slots__ = ("id", "model", "job_ids", "images", "timings")
    ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    JOB_IDS_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    id: str
    model: str
    job_ids: _containers.RepeatedScalarFieldContainer[str]
    images: _containers.RepeatedCompositeFieldContainer[Image]
    timings: Timings
    def __init__(self, id: _Optional[str] = ..., model: _Optional[str] = ..., job_ids: _Optional[_Iterable[str]] = ..., images: _Optional[_Iterable[_Union[Image, _Mapping]]] = ..., timings: _Optional[_Union[Timings, _Mapping]] = ...) -> None: ...

class JobEvent(_message.Message):
    __slots__ = ("job_id", "index", "type", "step", "total", "error")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    index: int
    type: str
    step: int
    total: int
    error: str
    def __init__(self, job_id: _Optional[str] = ..., index: _Optional[int] = ..., type: _Optional[str] = ..., step: _Optional[int] = ..., total: _Optional[int] = ..., error: _Optional[str] = ...) -> None: ...

class GenerateEvent(_message.Message):
    __slots__ = ("job_event", "result")
    JOB_EVENT_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    job_event: JobEvent
    result: GenerateReply
    def __init__(self, job_event: _Optional[_Union[JobEvent, _Mapping]] = ..., result: _Optional[_Union[GenerateReply, _Mapping]] = ...) -> None: ...

class GetJobRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class CancelJobRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class Job(_message.Message):
    __slots__ = ("id", "model", "status", "queue_position", "step", "total", "created", "started", "finished", "error", "result")
    ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    QUEUE_POSITION_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    STARTED_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    id: str
    model: str
    status: str
    queue_position: int
    step: int
    total: int
    created: float
    started: float
    finished: float
    error: str
    result: Image
    def __init__(self, id: _Optional[str] = ..., model: _Optional[str] = ..., status: _Optional[str] = ..., queue_position: _Optional[int] = ..., step: _Optional[int] = ..., total: _Optional[int] = ..., created: _Optional[float] = ..., started: _Optional[float] = ..., finished: _Optional[float] = ..., error: _Optional[str] = ..., result: _Optional[_Union[Image, _Mapping]] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Model(_message.Message):
    __slots__ = ("name", "default", "family", "width", "height", "size_multiple", "default_steps", "default_guidance_scale", "default_sampler", "samplers", "inpainting", "live_workers", "refiner", "task")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_FIELD_NUMBER: _ClassVar[int]
    FAMILY_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    SIZE_MULTIPLE_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_STEPS_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_GUIDANCE_SCALE_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_SAMPLER_FIELD_NUMBER: _ClassVar[int]
    SAMPLERS_FIELD_NUMBER: _ClassVar[int]
    INPAINTING_FIELD_NUMBER: _ClassVar[int]
    LIVE_WORKERS_FIELD_NUMBER: _ClassVar[int]
    REFINER_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    name: str
    default: bool
    family: str
    width: int
    height: int
    size_multiple: int
    default_steps: int
    default_guidance_scale: float
    default_sampler: str
    samplers: _containers.RepeatedScalarFieldContainer[str]
    inpainting: bool
    live_workers: int
    refiner: bool
    task: str
    def __init__(self, name: _Optional[str] = ..., default: _Optional[bool] = ..., family: _Optional[str] = ..., width: _Optional[int] = ..., height: _Optional[int] = ..., size_multiple: _Optional[int] = ..., default_steps: _Optional[int] = ..., default_guidance_scale: _Optional[float] = ..., default_sampler: _Optional[str] = ..., samplers: _Optional[_Iterable[str]] = ..., inpainting: _Optional[bool] = ..., live_workers: _Optional[int] = ..., refiner: _Optional[bool] = ..., task: _Optional[str] = ...) -> None: ...

class ListModelsReply(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[Model]
    def __init__(self, models: _Optional[_Iterable[_Union[Model, _Mapping]]] = ...) -> None: ...

class ListLorasRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Lora(_message.Message):
    __slots__ = ("name", "family", "rank", "bytes", "layers")
    NAME_FIELD_NUMBER: _ClassVar[int]
    FAMILY_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    name: str
    family: str
    rank: int
    bytes: int
    layers: int
    def __init__(self, name: _Optional[str] = ..., family: _Optional[str] = ..., rank: _Optional[int] = ..., bytes: _Optional[int] = ..., layers: _Optional[int] = ...) -> None: ...

class ListLorasReply(_message.Message):
    __slots__ = ("loras",)
    LORAS_FIELD_NUMBER: _ClassVar[int]
    loras: _containers.RepeatedCompositeFieldContainer[Lora]
    def __init__(self, loras: _Optional[_Iterable[_Union[Lora, _Mapping]]] = ...) -> None: ...
