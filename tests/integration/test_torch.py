"""`bnclient.torch` against a real server: every module matches torch's own, computed in float64.

The references are torch's `nn.BatchNorm*d` modules run in float64 on the same
input values (a float16 or bfloat16 input is widened exactly), so float32
results are held to 1e-5 and half-precision ones to their own rounding.
"""

from __future__ import annotations

import copy
import io
import pickle
import threading

import numpy as np
import pytest
import torch
from torch import nn

import bnclient
from bnclient import Client
from bnclient.torch import (
    BatchNorm1d,
    BatchNorm2d,
    BatchNorm3d,
    SyncBatchNorm,
    convert_batchnorm,
    convert_sync_batchnorm,
)

REMOTE = {"1d": BatchNorm1d, "2d": BatchNorm2d, "3d": BatchNorm3d}
LOCAL = {"1d": nn.BatchNorm1d, "2d": nn.BatchNorm2d, "3d": nn.BatchNorm3d}
SHAPES: dict[str, list[tuple[int, ...]]] = {
    "1d": [(12, 5), (6, 5, 4)],
    "2d": [(4, 5, 3, 4)],
    "3d": [(3, 5, 2, 3, 2)],
}
#: Output and gradient tolerance per input dtype (relative to values of about 1). float64
#: is held to 1e-6, not less: the server keeps running statistics in float32 and sends
#: weight and bias gradients as float32 (the optimizer steps carry that rounding on).
TOL = {torch.float16: 4e-3, torch.bfloat16: 3e-2, torch.float32: 1e-5, torch.float64: 1e-6}
DTYPES = list(TOL)


def sample(gen: torch.Generator, shape, dtype=torch.float32) -> torch.Tensor:
    """Data with a different offset and scale per channel."""
    view = (1, -1) + (1,) * (len(shape) - 2)
    loc = torch.linspace(-3.0, 4.0, shape[1], dtype=torch.float64).view(view)
    scale = torch.linspace(0.5, 2.5, shape[1], dtype=torch.float64).view(view)
    x = torch.randn(shape, generator=gen, dtype=torch.float64) * scale + loc
    return x.to(dtype)


def close(actual: torch.Tensor, expected: torch.Tensor, tol: float, what: str = "") -> None:
    a, e = actual.detach().to(torch.float64), expected.detach().to(torch.float64)
    assert a.shape == e.shape, what
    torch.testing.assert_close(a, e, rtol=tol, atol=tol, msg=lambda m: f"{what}: {m}")


def pair(client, name, kind, dtype, **config):
    """A remote module and its float64 torch reference with the same random weight and bias."""
    remote = REMOTE[kind](client, name, 5, **config)
    local = LOCAL[kind](5, **config).double()
    if dtype == torch.float64:
        remote = remote.double()
    if remote.affine:
        gen = torch.Generator().manual_seed(7)
        with torch.no_grad():
            remote.weight.copy_(torch.rand(5, generator=gen) + 0.5)
            remote.bias.copy_(torch.rand(5, generator=gen) - 0.5)
            local.weight.copy_(remote.weight)
            local.bias.copy_(remote.bias)
    return remote, local


CONFIGS = [
    pytest.param({}, id="default"),
    pytest.param({"momentum": None}, id="momentum_None"),
    pytest.param({"momentum": 0.3, "eps": 1e-3}, id="momentum0.3"),
    pytest.param({"affine": False}, id="affine_off"),
    pytest.param({"track_running_stats": False}, id="no_running_stats"),
]


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", list(REMOTE))
def test_module_matches_torch(client, name, kind, dtype, config) -> None:
    """Outputs, input and parameter gradients, running stats and num_batches_tracked over
    training steps with an optimizer, then eval, match torch's module in float64."""
    remote, local = pair(client, name, kind, dtype, **config)
    tol = TOL[dtype]
    gen = torch.Generator().manual_seed(1)
    opt_r = torch.optim.SGD(remote.parameters(), lr=0.1) if remote.affine else None
    opt_l = torch.optim.SGD(local.parameters(), lr=0.1) if local.affine else None
    for step in range(3):
        for shape in SHAPES[kind]:
            x = sample(gen, shape, dtype)
            g = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
            xr = x.clone().requires_grad_()
            xl = x.to(torch.float64).requires_grad_()
            y, yl = remote(xr), local(xl)
            assert y.dtype == dtype and y.shape == x.shape
            close(y, yl, tol, f"output, step {step}")
            (y.to(torch.float64) * g.to(torch.float64)).sum().backward()
            (yl * g.to(torch.float64)).sum().backward()
            assert xr.grad is not None and xr.grad.dtype == dtype
            close(xr.grad, xl.grad, tol, f"input gradient, step {step}")
            if remote.affine:
                close(remote.weight.grad, local.weight.grad, max(tol, 1e-5), "weight gradient")
                close(remote.bias.grad, local.bias.grad, max(tol, 1e-5), "bias gradient")
                opt_r.step()
                opt_l.step()
                opt_r.zero_grad()
                opt_l.zero_grad()
    if local.track_running_stats:
        for key in ("running_mean", "running_var"):
            close(getattr(remote, key), getattr(local, key), 1e-5, key)
        assert int(remote.num_batches_tracked) == int(local.num_batches_tracked)
        served = client.module(name).state_dict()
        close(torch.from_numpy(served["running_var"]).view(-1), local.running_var, 1e-5, "served")
    remote.eval()
    local.eval()
    x = sample(gen, SHAPES[kind][0], dtype)
    with torch.no_grad():
        close(remote(x), local(x.to(torch.float64)), tol, "eval output")
    xr, xl = x.clone().requires_grad_(), x.to(torch.float64).requires_grad_()
    remote(xr).to(torch.float64).sum().backward()
    local(xl).sum().backward()
    close(xr.grad, xl.grad, tol, "eval input gradient")
    assert not client.module(name).training  # the mode travelled with the forward


def test_float32_parameters_with_half_and_bfloat16_inputs_keep_their_dtype(client, name) -> None:
    bn = BatchNorm2d(client, name, 3)
    for dtype in (torch.float16, torch.bfloat16):
        x = torch.randn(4, 3, 2, 2).to(dtype).requires_grad_()
        y = bn(x)
        y.sum().backward()
        assert y.dtype == dtype and x.grad.dtype == dtype
        assert bn.weight.grad.dtype == torch.float32


def test_wrong_input_is_refused_before_and_by_the_server(client, name) -> None:
    bn = BatchNorm2d(client, name, 3)
    with pytest.raises(ValueError, match="4D"):
        bn(torch.randn(2, 3))
    with pytest.raises(bnclient.InvalidArgumentError, match="channels"):
        bn(torch.randn(2, 4, 2, 2))
    with pytest.raises(TypeError, match="float"):
        bn(torch.ones(2, 3, 2, 2, dtype=torch.int64))
    with pytest.raises(bnclient.InvalidArgumentError, match="more than 1 value"):
        bn(torch.randn(1, 3, 1, 1))
    assert int(bn.num_batches_tracked) == 0 and client.module(name).num_batches_tracked == 0


def test_modules_attach_to_an_existing_server_module(client, name) -> None:
    first = BatchNorm1d(client, name, 4, momentum=None)
    with torch.no_grad():
        first.weight.fill_(2.0)
    first(torch.randn(8, 4) + 3)  # sends the weight, trains
    second = BatchNorm1d(client, name, 4, momentum=None)
    assert torch.equal(second.weight, first.weight)
    assert torch.equal(second.running_mean, first.running_mean)
    assert int(second.num_batches_tracked) == 1
    with pytest.raises(bnclient.AlreadyExistsError):
        BatchNorm1d(client, name, 4, momentum=0.1)


def test_changing_eps_or_momentum_after_creation_is_refused(client, name) -> None:
    bn = BatchNorm1d(client, name, 4)
    bn.momentum = 0.5
    with pytest.raises(ValueError, match="fixed"):
        bn(torch.randn(8, 4))


# -- models -------------------------------------------------------------------------------


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(2, 4, 3, padding=1),
            nn.BatchNorm2d(4),
            nn.ReLU(),
            nn.Conv2d(4, 6, 3, padding=1, stride=2),
            nn.BatchNorm2d(6, momentum=None),
            nn.ReLU(inplace=True),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(6 * 4 * 4, 8), nn.BatchNorm1d(8))
        self.out = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.head(self.features(x))))


def _batches(steps: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        yield (
            torch.randn(6, 2, 8, 8, generator=gen) * 2 + 1,
            torch.randint(0, 3, (6,), generator=gen),
        )


def test_converted_model_trains_like_the_local_one_step_by_step(client, name) -> None:
    torch.manual_seed(0)
    local = Net().double()
    remote = convert_batchnorm(copy.deepcopy(local).float(), client, prefix=name)
    names = sorted(m.name for m in client.list_modules() if m.name.startswith(name + "."))
    assert names == [f"{name}.features.1", f"{name}.features.4", f"{name}.head.2"]
    assert isinstance(remote.features[1], BatchNorm2d) and isinstance(remote.head[2], BatchNorm1d)
    opt_l = torch.optim.SGD(local.parameters(), lr=0.1, momentum=0.9)
    opt_r = torch.optim.SGD(remote.parameters(), lr=0.1, momentum=0.9)
    for step, (x, target) in enumerate(_batches(5)):
        for model, opt, dtype in ((local, opt_l, torch.float64), (remote, opt_r, torch.float32)):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x.to(dtype)), target)
            loss.backward()
            opt.step()
            if model is local:
                want = loss.item()
            else:
                assert loss.item() == pytest.approx(want, rel=1e-5, abs=1e-5), step
    for (key, a), (_, b) in zip(
        remote.state_dict().items(), local.state_dict().items(), strict=True
    ):
        close(a, b, 1e-4, key)
    remote.eval()
    local.eval()
    x, _ = next(_batches(1, seed=9))
    with torch.no_grad():
        close(remote(x), local(x.double()), 1e-4, "eval")


def test_state_dict_round_trips_between_local_and_remote_models(client, name, tmp_path) -> None:
    torch.manual_seed(1)
    local = Net()
    for x, _ in _batches(2):
        local(x)  # running stats that differ from the defaults
    remote = convert_batchnorm(copy.deepcopy(local), client, prefix=name)
    # local -> remote: the conversion copied everything, onto the server too.
    for (key, a), (key_l, b) in zip(
        remote.state_dict().items(), local.state_dict().items(), strict=True
    ):
        assert key == key_l and torch.equal(a, b), key
    served = client.module(f"{name}.features.4")
    assert served.num_batches_tracked == 2
    np.testing.assert_array_equal(
        served.running_var.reshape(-1), local.state_dict()["features.4.running_var"].numpy()
    )
    # remote trains on; torch.save of its state_dict loads into the local model.
    for x, _ in _batches(3, seed=5):
        remote(x)
    path = tmp_path / "remote.pt"
    torch.save(remote.state_dict(), path)
    fresh = Net()
    fresh.load_state_dict(torch.load(path))
    assert int(fresh.features[4].num_batches_tracked) == 5
    for (key, a), (_, b) in zip(
        fresh.state_dict().items(), remote.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), key
    # And back: a local state_dict loads into the remote model and onto the server.
    buf = io.BytesIO()
    torch.save(local.state_dict(), buf)
    buf.seek(0)
    remote.load_state_dict(torch.load(buf))
    assert int(served.num_batches_tracked) == 2
    np.testing.assert_array_equal(
        served.running_mean.reshape(-1), local.state_dict()["features.4.running_mean"].numpy()
    )
    with pytest.raises(RuntimeError, match="size mismatch"):
        remote.load_state_dict({**local.state_dict(), "head.2.weight": torch.ones(3)})


def test_deepcopy_and_pickle_attach_to_the_same_server_module(client, name) -> None:
    torch.manual_seed(2)
    model = convert_batchnorm(Net(), client, prefix=name)
    for x, _ in _batches(2):
        model(x)
    copied = copy.deepcopy(model)
    unpickled = pickle.loads(pickle.dumps(model))
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    for other in (copied, unpickled, loaded):
        assert other.features[1].name == f"{name}.features.1"
        assert other.features[1].weight is not model.features[1].weight
        model.eval()
        other.eval()
        x, _ = next(_batches(1, seed=3))
        with torch.no_grad():
            assert torch.equal(other(x), model(x))
        # Training through the copy moves the one server module that both read.
        other.train()
        other(x)
        assert torch.equal(
            model.state_dict()["features.1.running_mean"],
            other.state_dict()["features.1.running_mean"],
        )
        model.train()
    assert client.module(f"{name}.features.1").num_batches_tracked == 5


def test_a_forward_without_gradient_keeps_no_backward_context(tmp_path) -> None:
    """Inspects an in-process server's backward store (a real gRPC server and client)."""
    from bnserver.engine import Engine
    from bnserver.rpc.server import create_server

    engine = Engine()
    server, port = create_server("127.0.0.1:0", engine)
    server.start()
    try:
        with Client(f"127.0.0.1:{port}") as client:
            bn = BatchNorm2d(client, "bn", 3)
            x = torch.randn(4, 3, 2, 2)
            with torch.no_grad():
                bn(x.requires_grad_())
            assert engine.backward_handles() == 0
            x = x.detach()
            bn.requires_grad_(False)
            bn(x)  # grad mode on, but nothing requires grad
            assert engine.backward_handles() == 0
            with torch.inference_mode():
                bn(x)
            assert engine.backward_handles() == 0
            bn.requires_grad_(True)
            y = bn(x)  # the weight requires grad: backward needs the context
            assert engine.backward_handles() == 1
            y.sum().backward()
            assert engine.backward_handles() == 0
            assert bn.weight.grad is not None
            assert int(bn.num_batches_tracked) == 4  # every one of them trained
    finally:
        server.stop(None)


# -- SyncBatchNorm ---------------------------------------------------------------------


def _run_ranks(world_size: int, work) -> list:
    results: list = [None] * world_size
    errors: list[BaseException] = []

    def run(rank: int) -> None:
        try:
            results[rank] = work(rank)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(r,)) for r in range(world_size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    return results


@pytest.mark.parametrize("world_size", [2, 4])
@pytest.mark.parametrize("shape", [(11, 3, 4, 5), (13, 3)], ids=["4d", "2d"])
def test_sync_batchnorm_matches_torch_on_the_whole_batch(server, name, world_size, shape) -> None:
    gen = torch.Generator().manual_seed(world_size)
    local = nn.BatchNorm2d(3) if len(shape) == 4 else nn.BatchNorm1d(3)
    local = local.double()
    with torch.no_grad():
        local.weight.copy_(torch.tensor([0.5, 1.5, 2.0]))
        local.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
    steps = [
        (sample(gen, shape), torch.randn(shape, generator=gen, dtype=torch.float64))
        for _ in range(3)
    ]
    # Uneven slices of each global batch, one rank with an empty one when there are 4.
    bounds = [0, 5, shape[0]] if world_size == 2 else [0, 4, 4, 9, shape[0]]
    slices = [slice(bounds[r], bounds[r + 1]) for r in range(world_size)]

    def rank_work(rank: int):
        with Client(server.address) as client:
            bn = SyncBatchNorm(client, name, 3, group=name, rank=rank, world_size=world_size)
            with torch.no_grad():
                bn.weight.copy_(local.weight)
                bn.bias.copy_(local.bias)
            out = []
            for x, g in steps:
                xr = x[slices[rank]].clone().requires_grad_()
                y = bn(xr)
                (y.double() * g[slices[rank]]).sum().backward()
                out.append((y.detach(), xr.grad, bn.weight.grad.clone(), bn.bias.grad.clone()))
                bn.weight.grad = bn.bias.grad = None
            return out, bn.running_mean.clone(), bn.running_var.clone(), int(bn.num_batches_tracked)

    results = _run_ranks(world_size, rank_work)
    for step, (x, g) in enumerate(steps):
        xl = x.double().requires_grad_()
        y = local(xl)
        (y * g).sum().backward()
        close(torch.cat([r[0][step][0] for r in results]), y, 1e-5, f"output {step}")
        close(torch.cat([r[0][step][1] for r in results]), xl.grad, 1e-5, f"dx {step}")
        close(sum(r[0][step][2] for r in results), local.weight.grad, 1e-5, "dweight")
        close(sum(r[0][step][3] for r in results), local.bias.grad, 1e-5, "dbias")
        local.zero_grad()
    for _, running_mean, running_var, batches in results:
        close(running_mean, local.running_mean, 1e-5, "running_mean")
        close(running_var, local.running_var, 1e-5, "running_var")
        assert batches == 3


def test_convert_sync_batchnorm_names_every_rank_alike(server, name) -> None:
    torch.manual_seed(3)
    base = Net()
    x, _ = next(_batches(1))

    def rank_work(rank: int):
        with Client(server.address) as client:
            model = convert_sync_batchnorm(
                copy.deepcopy(base), client, group=name, rank=rank, world_size=2, prefix=name
            )
            assert isinstance(model.features[1], SyncBatchNorm)
            return model(x[rank * 3 : rank * 3 + 3]).detach(), model.features[1].name

    (y0, n0), (y1, n1) = _run_ranks(2, rank_work)
    assert n0 == n1 == f"{name}.features.1"
    with torch.no_grad():
        want = base(x)
    close(torch.cat([y0, y1]), want, 1e-5, "whole-batch output")
