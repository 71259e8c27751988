"""PyTorch modules backed by bnservice: remote BatchNorm as a drop-in `torch.nn.Module`.

    from bnclient import Client
    from bnclient.torch import BatchNorm2d, convert_batchnorm

    client = Client("127.0.0.1:50051")
    bn = BatchNorm2d(client, "net.bn1", 64)            # torch's constructor after (client, name)
    model = convert_batchnorm(model, client, prefix="job-7")   # every nn.BatchNorm*d remote

The modules speak PyTorch's conventions: momentum (0.1, or None for the
cumulative average), the state_dict layout (weight, bias, running_mean,
running_var, num_batches_tracked, all (C,)), train()/eval(). They subclass
torch's `_BatchNorm`, so code that looks for batch norm layers finds them.

What lives where:

* weight and bias are local `nn.Parameter`s: any torch optimizer updates them,
  and each forward sends them with the input, together with the module's
  mode (`self.training`). The server uses them for that call and stores them.
  One forward is one call; backward is one more.
* The running statistics and `num_batches_tracked` live on the server. The
  buffers of the same names are a local copy: a training forward's reply
  refreshes them, and `state_dict()` reads them from the server first.
  `load_state_dict()` writes them (and weight and bias) to the server.
* Autograd runs through the server's backward. A forward keeps a backward
  context on the server only when a gradient can flow (grad mode on and the
  input, weight or bias requiring grad).

Tensors are CPU tensors of float16, bfloat16 (sent and computed as float32),
float32 or float64; the output has the input's dtype. `copy.deepcopy` and
pickling give a module attached to the same server module (same name), with
its own copy of weight and bias. eps and momentum are fixed when the server
module is created.

Needs the optional extra `bnservice[torch]`.
"""

from __future__ import annotations

from typing import Any, cast

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from bnclient import modules as proxies
from bnclient.client import Client
from bnclient.modules import COUNT_KEY, VJP, _writable

__all__ = [
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "RemoteBatchNorm",
    "SyncBatchNorm",
    "convert_batchnorm",
    "convert_sync_batchnorm",
]

#: The dtypes a tensor travels as (bfloat16 has no numpy twin: it travels as float32).
_WIRE_DTYPES = {
    torch.float16: torch.float16,
    torch.bfloat16: torch.float32,
    torch.float32: torch.float32,
    torch.float64: torch.float64,
}

_RUNNING_KEYS = ("running_mean", "running_var", COUNT_KEY)


def _megengine_momentum(momentum: float | None) -> float | None:
    """PyTorch's momentum (the batch's weight) as the server's (the old value's weight)."""
    return None if momentum is None else 1.0 - float(momentum)


def _to_numpy(tensor: Tensor) -> np.ndarray:
    """A CPU tensor's data as a C-contiguous ndarray of its wire dtype (no copy if it can)."""
    if tensor.device.type != "cpu":
        raise ValueError(f"bnclient.torch takes CPU tensors, got one on {tensor.device}")
    wire = _WIRE_DTYPES.get(tensor.dtype)
    if wire is None:
        raise TypeError(
            f"expected a float16, bfloat16, float32 or float64 tensor, got {tensor.dtype}"
        )
    array: np.ndarray = tensor.detach().to(wire).contiguous().numpy()
    return array


def _to_tensor(array: np.ndarray, dtype: torch.dtype) -> Tensor:
    """A tensor of `dtype` holding `array` (a read-only reply view is copied)."""
    tensor: Tensor = torch.from_numpy(_writable(array))
    return tensor if tensor.dtype == dtype else tensor.to(dtype)


class _RemoteForward(torch.autograd.Function):
    """Forward and backward of a remote module, as one autograd node."""

    @staticmethod
    def forward(
        ctx: Any, x: Tensor, weight: Tensor | None, bias: Tensor | None, module: RemoteBatchNorm
    ) -> Tensor:
        y, handle = module._remote_forward(x, keep_for_backward=True)
        ctx.module = module
        ctx.handle = handle
        ctx.dtypes = (x.dtype, None if weight is None else weight.dtype)
        return y

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        x_dtype, w_dtype = ctx.dtypes
        dx, dweight, dbias = VJP(ctx.module._remote, ctx.handle)._call(_to_numpy(grad))
        grads: list[Tensor | None] = [_to_tensor(dx, x_dtype), None, None, None]
        if dweight is not None and dbias is not None and w_dtype is not None:
            grads[1] = torch.from_numpy(dweight.reshape(-1)).to(w_dtype)
            grads[2] = torch.from_numpy(dbias.reshape(-1)).to(w_dtype)
        return tuple(
            g if need else None for g, need in zip(grads, ctx.needs_input_grad, strict=True)
        )


class RemoteBatchNorm(_BatchNorm):
    """The common base of the remote modules (an abstract class, like torch's `_BatchNorm`).

    client: the connection to the server; name: the server module's name.
    The constructor gets or creates the server module; when it existed
    already, the new module takes over its weight, bias and running statistics.
    """

    #: Accepted input ranks.
    _ndims: tuple[int, ...] = ()

    def __init__(
        self,
        client: Client,
        name: str,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        if device is not None and torch.device(device).type != "cpu":
            raise ValueError(f"bnclient.torch modules live on the CPU, not {device}")
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        self.name = name
        self._config = (float(eps), momentum)
        self._remote = self._attach(client)
        with torch.no_grad():
            state = self._remote._state()
            for key, value in state.items():
                self._adopt(key, value)

    def _attach(self, client: Client) -> proxies.BatchNorm:
        """Get or create the server module."""
        raise NotImplementedError

    @property
    def client(self) -> Client:
        return self._remote.client

    def extra_repr(self) -> str:
        return f"{self.name!r}, {super().extra_repr()}"  # type: ignore[no-untyped-call]

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() not in self._ndims:
            expected = " or ".join(f"{n}D" for n in self._ndims)
            raise ValueError(f"expected {expected} input (got {input.dim()}D input)")

    # -- forward ------------------------------------------------------------------

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        if (float(self.eps), self.momentum) != self._config:
            raise ValueError(
                f"{type(self).__name__} {self.name!r}: eps and momentum are fixed when the "
                f"server module is created (eps={self._config[0]}, momentum={self._config[1]})"
            )
        params = [p for p in (self.weight, self.bias) if p is not None]
        if torch.is_grad_enabled() and (
            input.requires_grad or any(p.requires_grad for p in params)
        ):
            y = _RemoteForward.apply(input, self.weight, self.bias, self)  # type: ignore[no-untyped-call]
            return cast(Tensor, y)
        y, _ = self._remote_forward(input, keep_for_backward=False)
        return y

    def _remote_forward(self, x: Tensor, keep_for_backward: bool) -> tuple[Tensor, str]:
        """One Forward call with this module's weight, bias and mode; refreshes the
        running-statistics buffers when it updates them. Returns (y, backward handle)."""
        weight = bias = None
        if self.weight is not None and self.bias is not None:
            weight, bias = _to_numpy(self.weight), _to_numpy(self.bias)
        updates = self.training and self.track_running_stats
        result = self._remote._forward(
            _to_numpy(x),
            keep_for_backward,
            weight,
            bias,
            training=self.training,
            return_running_stats=updates,
        )
        if updates:
            with torch.no_grad():
                for key, value in result.running_stats.items():
                    self._adopt(key, value)
        return _to_tensor(result.output, x.dtype), result.handle

    # -- state ----------------------------------------------------------------------

    def _adopt(self, key: str, value: Any) -> None:
        """Copy one server state entry into the parameter or buffer of that name."""
        local = getattr(self, key, None)
        if isinstance(local, Tensor):
            if key == COUNT_KEY:
                local.fill_(int(value))
            else:
                local.copy_(torch.from_numpy(np.asarray(value).reshape(-1)))

    def refresh(self) -> None:
        """Read the running statistics and num_batches_tracked from the server."""
        if not self.track_running_stats:
            return
        with torch.no_grad():
            for key, value in self._remote._state(_RUNNING_KEYS).items():
                self._adopt(key, value)

    def push(self) -> None:
        """Write this module's weight, bias, running statistics and num_batches_tracked
        to the server module."""
        state: dict[str, Any] = {}
        for key in ("weight", "bias", "running_mean", "running_var"):
            value = getattr(self, key)
            if value is not None:
                state[key] = _to_numpy(value)
        if self.num_batches_tracked is not None:
            state[COUNT_KEY] = int(self.num_batches_tracked)
        self._remote.load_state_dict(state, strict=False)

    def _save_to_state_dict(self, destination: Any, prefix: str, keep_vars: bool) -> None:
        self.refresh()
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def _load_from_state_dict(
        self,
        state_dict: Any,
        prefix: str,
        local_metadata: Any,
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        errors = len(error_msgs)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        if len(error_msgs) == errors:
            self.push()

    def reset_running_stats(self) -> None:
        super().reset_running_stats()
        if "_remote" in self.__dict__:  # not while torch's constructor runs
            self._remote.reset_running_stats()

    def reset_parameters(self) -> None:
        super().reset_parameters()  # calls reset_running_stats
        if "_remote" in self.__dict__ and self.affine:
            self.push()


class BatchNorm1d(RemoteBatchNorm):
    """Remote `torch.nn.BatchNorm1d`: (N, C) or (N, C, L) input."""

    _ndims: tuple[int, ...] = (2, 3)

    def _attach(self, client: Client) -> proxies.BatchNorm:
        return client.batch_norm_1d(self.name, self.num_features, *self._server_config())

    def _server_config(self) -> tuple[float, float | None, bool, bool]:
        return (
            self.eps,
            _megengine_momentum(self.momentum),
            self.affine,
            self.track_running_stats,
        )


class BatchNorm2d(BatchNorm1d):
    """Remote `torch.nn.BatchNorm2d`: (N, C, H, W) input."""

    _ndims = (4,)

    def _attach(self, client: Client) -> proxies.BatchNorm:
        return client.batch_norm_2d(self.name, self.num_features, *self._server_config())


class BatchNorm3d(BatchNorm1d):
    """Remote `torch.nn.BatchNorm3d`: (N, C, D, H, W) input."""

    _ndims = (5,)

    def _attach(self, client: Client) -> proxies.BatchNorm:
        return client.batch_norm_3d(self.name, self.num_features, *self._server_config())


class SyncBatchNorm(RemoteBatchNorm):
    """Remote `torch.nn.SyncBatchNorm`: rank `rank` of `world_size` in `group`.

    Each rank (a process or thread with a Client of its own, on one server or
    several) normalizes with the statistics of the whole global batch; a
    training forward waits for every rank's forward of the same step, and a
    backward for every rank's backward. weight and bias gradients stay local
    to each rank, as in torch (DistributedDataParallel averages them). 2-D to
    5-D input.
    """

    _ndims = (2, 3, 4, 5)

    def __init__(
        self,
        client: Client,
        name: str,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        *,
        group: str,
        rank: int,
        world_size: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        self.group = group
        self.rank = int(rank)
        self.world_size = int(world_size)
        super().__init__(
            client, name, num_features, eps, momentum, affine, track_running_stats, device, dtype
        )

    def _attach(self, client: Client) -> proxies.BatchNorm:
        return client.sync_batch_norm(
            self.name,
            self.num_features,
            self.eps,
            _megengine_momentum(self.momentum),
            self.affine,
            self.track_running_stats,
            group=self.group,
            rank=self.rank,
            world_size=self.world_size,
        )

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, group={self.group!r}, rank={self.rank}, "
            f"world_size={self.world_size}"
        )


_TWINS: dict[type[nn.Module], type[BatchNorm1d]] = {
    nn.BatchNorm1d: BatchNorm1d,
    nn.BatchNorm2d: BatchNorm2d,
    nn.BatchNorm3d: BatchNorm3d,
}


def _take_state(remote: RemoteBatchNorm, local: _BatchNorm) -> RemoteBatchNorm:
    """Give `remote` the parameters (the same objects, so optimizers keep them),
    buffers and mode of `local`, and write them to the server."""
    if local.affine:
        if local.bias is None:
            raise ValueError("bnclient.torch modules need a bias with affine=True (bias=False)")
        remote.weight = local.weight
        remote.bias = local.bias
    if local.track_running_stats:
        remote.running_mean = local.running_mean
        remote.running_var = local.running_var
        remote.num_batches_tracked = local.num_batches_tracked
    remote.train(local.training)
    remote.push()
    return remote


def _check_local(module: _BatchNorm) -> None:
    params = [t for t in (*module.parameters(recurse=False), *module.buffers(recurse=False))]
    if any(t.device.type != "cpu" for t in params):
        raise ValueError("bnclient.torch converts CPU modules only; move the model to the CPU")


def _qualified(prefix: str, path: str) -> str:
    return f"{prefix}.{path}" if path else prefix


def convert_batchnorm(module: nn.Module, client: Client, prefix: str) -> nn.Module:
    """Replace every `torch.nn.BatchNorm1d/2d/3d` in `module` by its remote twin.

    Each twin is the server module named ``f"{prefix}.{qualified_name}"`` (the
    dotted path of the layer in `module`; just `prefix` when `module` itself is
    a batch norm). It takes over the layer's weight and bias (the same
    Parameter objects, so an optimizer made before still updates them),
    running statistics, num_batches_tracked and mode, and writes them to the
    server. Returns the converted module (`module` itself unless it is a
    batch norm layer), like `torch.nn.SyncBatchNorm.convert_sync_batchnorm`.
    """
    return _convert(module, prefix, "", lambda local, name: _twin(local, client, name))


def convert_sync_batchnorm(
    module: nn.Module, client: Client, group: str, rank: int, world_size: int, prefix: str
) -> nn.Module:
    """Replace every local batch norm layer (BatchNorm1d/2d/3d, SyncBatchNorm) in `module`
    by a remote `SyncBatchNorm`, rank `rank` of `world_size` in `group`.

    Names and state as in `convert_batchnorm`; every rank converts the same
    model with the same prefix, so the ranks of one layer share its name.
    """

    def make(local: _BatchNorm, name: str) -> RemoteBatchNorm:
        _check_local(local)
        remote = SyncBatchNorm(
            client,
            name,
            local.num_features,
            local.eps,
            local.momentum,
            local.affine,
            local.track_running_stats,
            group=group,
            rank=rank,
            world_size=world_size,
        )
        return _take_state(remote, local)

    return _convert(module, prefix, "", make, sync=True)


def _twin(local: _BatchNorm, client: Client, name: str) -> RemoteBatchNorm:
    _check_local(local)
    cls = next(twin for base, twin in _TWINS.items() if isinstance(local, base))
    remote = cls(
        client,
        name,
        local.num_features,
        local.eps,
        local.momentum,
        local.affine,
        local.track_running_stats,
    )
    return _take_state(remote, local)


def _convert(
    module: nn.Module,
    prefix: str,
    path: str,
    make: Any,
    sync: bool = False,
) -> nn.Module:
    convertible: tuple[type[nn.Module], ...] = tuple(_TWINS)
    if sync:
        convertible += (nn.SyncBatchNorm,)
    if isinstance(module, convertible) and not isinstance(module, RemoteBatchNorm):
        output: nn.Module = make(module, _qualified(prefix, path))
    else:
        output = module
    for child_name, child in module.named_children():
        child_path = f"{path}.{child_name}" if path else child_name
        output.add_module(child_name, _convert(child, prefix, child_path, make, sync))
    return output
