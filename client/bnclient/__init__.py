"""bnclient: the Python SDK of bnservice.

from bnclient import Client
with Client("127.0.0.1:50051") as client:
    bn = client.batch_norm_2d("stem.bn", 64)
    y = bn(x)

The PyTorch modules are in `bnclient.torch` (the optional extra
`bnservice[torch]`); importing `bnclient` never imports torch.
"""

from bnclient.client import Client
from bnclient.errors import (
    AbortedError,
    AlreadyExistsError,
    CancelledError,
    DeadlineExceededError,
    InternalError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    ResourceExhaustedError,
    ServiceError,
    UnauthenticatedError,
    UnavailableError,
)
from bnclient.modules import (
    VJP,
    BatchNorm,
    BatchNorm1d,
    BatchNorm2d,
    BatchNorm3d,
    ModuleInfo,
    SyncBatchNorm,
)

__all__ = [
    "VJP",
    "AbortedError",
    "AlreadyExistsError",
    "BatchNorm",
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "CancelledError",
    "Client",
    "DeadlineExceededError",
    "InternalError",
    "InvalidArgumentError",
    "ModuleInfo",
    "NotFoundError",
    "PermissionDeniedError",
    "ResourceExhaustedError",
    "ServiceError",
    "SyncBatchNorm",
    "UnauthenticatedError",
    "UnavailableError",
]
__version__ = "0.1.0"
