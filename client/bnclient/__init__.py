"""bnclient: the Python SDK of bnservice.

from bnclient import Client
with Client("127.0.0.1:50051") as client:
    bn = client.batch_norm_2d("stem.bn", 64)
    y = bn(x)
"""

from bnclient.client import Client, ModuleInfo
from bnclient.errors import (
    AbortedError,
    AlreadyExistsError,
    DeadlineExceededError,
    InternalError,
    InvalidArgumentError,
    NotFoundError,
    ResourceExhaustedError,
    ServiceError,
    UnauthenticatedError,
    UnavailableError,
)
from bnclient.modules import VJP, BatchNorm, BatchNorm1d, BatchNorm2d, SyncBatchNorm

__all__ = [
    "VJP",
    "AbortedError",
    "AlreadyExistsError",
    "BatchNorm",
    "BatchNorm1d",
    "BatchNorm2d",
    "Client",
    "DeadlineExceededError",
    "InternalError",
    "InvalidArgumentError",
    "ModuleInfo",
    "NotFoundError",
    "ResourceExhaustedError",
    "ServiceError",
    "SyncBatchNorm",
    "UnauthenticatedError",
    "UnavailableError",
]
__version__ = "0.1.0"
