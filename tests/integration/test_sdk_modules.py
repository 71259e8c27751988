"""The numpy SDK's module handling: attaching by name, proxies from list_modules,
BatchNorm3d, momentum None, PyTorch's state_dict keys, pickling and copying proxies."""

from __future__ import annotations

import copy
import pickle
from typing import assert_type

import numpy as np
import pytest

import bnclient
from bnclient import BatchNorm1d, BatchNorm2d, BatchNorm3d, Client, SyncBatchNorm


def test_module_attaches_by_name_with_the_right_class_and_config(client, name) -> None:
    created = [
        client.batch_norm_1d(name + ".1d", 3, eps=1e-3, momentum=None, affine=False),
        client.batch_norm_2d(name + ".2d", 4, momentum=0.5),
        client.batch_norm_3d(name + ".3d", 5, track_running_stats=False),
        client.sync_batch_norm(name + ".s", 6, group=name, rank=1, world_size=2, eps_mode="max"),
    ]
    created[1].eval()
    for made in created:
        rank = getattr(made, "rank", 0)
        attached = client.module(made.name, rank=rank)
        assert type(attached) is type(made)
        assert vars(attached).keys() == vars(made).keys()
        for key, value in vars(made).items():
            if key not in ("_client", "_ref"):
                assert getattr(attached, key) == value, key
    assert client.module(name + ".1d").momentum is None
    assert not client.module(name + ".2d").training
    assert client.module(name + ".s", rank=1).eps_mode == "max"
    with pytest.raises(bnclient.NotFoundError):
        client.module(name + ".missing")
    with pytest.raises(bnclient.NotFoundError):
        client.module(name + ".s")  # rank 0 of that group is not on this server


def test_list_modules_gives_proxies_on_request(client, name) -> None:
    client.batch_norm_1d(name + ".a", 3)
    client.batch_norm_3d(name + ".b", 3)
    infos = [m for m in client.list_modules() if m.name.startswith(name)]
    assert all(isinstance(m, bnclient.ModuleInfo) for m in infos)
    proxies = [m for m in client.list_modules(proxies=True) if m.name.startswith(name)]
    assert [type(p) for p in proxies] == [BatchNorm1d, BatchNorm3d]
    x = np.random.default_rng(0).standard_normal((2, 3, 2, 2, 2))
    assert proxies[1](x).shape == x.shape


def test_train_and_eval_return_the_proxy_itself(client: Client, name: str) -> None:
    bn = client.batch_norm_2d(name, 3)
    same = assert_type(bn.eval(), BatchNorm2d)
    assert same is bn and not bn.training
    sync = client.sync_batch_norm(name + ".s", 3, group=name, rank=0, world_size=1)
    assert assert_type(sync.train(), SyncBatchNorm) is sync


def test_batch_norm_3d_normalizes_over_n_d_h_w(client, name) -> None:
    bn = client.batch_norm_3d(name, 4, momentum=0.8)
    x = (np.random.default_rng(1).standard_normal((3, 4, 2, 3, 2)) * 2 + 5).astype(np.float32)
    y = bn(x)
    x64 = x.astype(np.float64)
    mean = x64.mean(axis=(0, 2, 3, 4), keepdims=True)
    var = x64.var(axis=(0, 2, 3, 4), keepdims=True)
    np.testing.assert_allclose(y, (x64 - mean) / np.sqrt(var + 1e-5), atol=1e-5)
    np.testing.assert_allclose(bn.running_mean.reshape(-1), 0.2 * mean.reshape(-1), rtol=1e-6)
    with pytest.raises(bnclient.InvalidArgumentError, match="5D"):
        bn(x[0])


def test_momentum_none_averages_every_training_batch(client, name) -> None:
    bn = client.batch_norm_1d(name, 3, momentum=None)
    rng = np.random.default_rng(2)
    batches = [rng.standard_normal((8, 3)) + k for k in range(3)]
    for x in batches:
        bn(x)
    np.testing.assert_allclose(
        bn.running_mean.reshape(-1), np.mean([x.mean(axis=0) for x in batches], axis=0), 1e-6
    )
    assert bn.num_batches_tracked == 3
    bn.reset_running_stats()
    assert bn.num_batches_tracked == 0


def test_load_state_dict_takes_pytorchs_keys_and_shapes(client, name) -> None:
    bn = client.batch_norm_2d(name, 3)
    torch_state = {
        "weight": np.array([1.0, 2.0, 3.0], np.float32),
        "bias": np.zeros(3, np.float32),
        "running_mean": np.array([0.5, 0.25, 0.125], np.float32),
        "running_var": np.full(3, 4.0, np.float32),
        "num_batches_tracked": np.array(17, np.int64),
    }
    bn.load_state_dict(torch_state)
    assert bn.num_batches_tracked == 17
    assert np.array_equal(bn.weight.reshape(-1), torch_state["weight"])
    assert sorted(bn.state_dict()) == ["bias", "running_mean", "running_var", "weight"]
    with pytest.raises(bnclient.InvalidArgumentError, match="integer"):
        bn.load_state_dict({"num_batches_tracked": 1.5}, strict=False)
    untracked = client.batch_norm_2d(name + ".u", 3, track_running_stats=False)
    with pytest.raises(bnclient.InvalidArgumentError, match="num_batches_tracked"):
        untracked.load_state_dict({"num_batches_tracked": 0}, strict=False)
    assert untracked.num_batches_tracked is None


def test_property_reads_return_their_entry(client, name) -> None:
    bn = client.batch_norm_1d(name, 3, affine=False)
    assert bn.weight is None and bn.bias is None
    assert bn.running_var.shape == (1, 3, 1, 1) and bn.running_var.dtype == np.float32
    assert bn.running_var.flags.writeable


def test_proxies_pickle_and_deepcopy_onto_the_same_module(server, name) -> None:
    with Client(server.address, timeout=30.0, retries=2) as client:
        bn = client.batch_norm_2d(name, 3)
        copied = copy.deepcopy(bn)
        assert copied.client is client  # one connection, shared
        unpickled = pickle.loads(pickle.dumps(bn))
        assert unpickled.client is not client
        assert (unpickled.client.target, unpickled.client.timeout) == (server.address, 30.0)
        x = np.random.default_rng(3).standard_normal((4, 3, 2, 2))
        copied(x)
        unpickled(x)
        assert bn.num_batches_tracked == 2
        unpickled.client.close()
