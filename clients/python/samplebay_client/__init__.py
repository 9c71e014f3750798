"""samplebay-client: a Python client for a samplebay server, without the server (no torch): httpx, numpy, PIL.

    from samplebay_client import Client

    with Client("http://127.0.0.1:8000") as client:
        client.sample("eqm_mnist", n=16, label=7, seed=1).grid().save("sevens.png")

Everything public is named here; the modules behind it (client, answers, errors) may move.
"""

from samplebay_client.answers import (
    EventParser,
    Frame,
    ImageInput,
    ModelInfo,
    SampleFields,
    SampleFile,
    Samples,
    Timings,
    image_grid,
)
from samplebay_client.client import AsyncClient, Client, RetryPolicy
from samplebay_client.errors import (
    AnswerTooLarge,
    BadAnswer,
    BadRequest,
    ConnectionFailed,
    FieldProblem,
    NotFound,
    SamplebayError,
    ServerBusy,
    StreamInterrupted,
    Timeout,
    Unauthorized,
)
from samplebay_client.limits import Limits
from samplebay_client.scores import ScoreResult, Scores

__version__ = "0.1.0"
__all__ = [
    "AnswerTooLarge",
    "AsyncClient",
    "BadAnswer",
    "BadRequest",
    "Client",
    "ConnectionFailed",
    "EventParser",
    "FieldProblem",
    "Frame",
    "ImageInput",
    "Limits",
    "ModelInfo",
    "NotFound",
    "RetryPolicy",
    "SampleFields",
    "SampleFile",
    "SamplebayError",
    "Samples",
    "ScoreResult",
    "Scores",
    "ServerBusy",
    "StreamInterrupted",
    "Timeout",
    "Timings",
    "Unauthorized",
    "image_grid",
]
