"""The SDK's public surface: everything it exports is in __all__, every exception it can
raise is exported, and no protocol (protobuf) type appears in a public signature."""

from __future__ import annotations

import inspect
import types

import grpc

import bnclient
import bnclient.torch
from bnclient import errors


def test_all_lists_exactly_the_public_members() -> None:
    public = {
        name
        for name, value in vars(bnclient).items()
        if not name.startswith("_") and not isinstance(value, types.ModuleType)
    }
    assert sorted(bnclient.__all__) == sorted(public)
    assert len(set(bnclient.__all__)) == len(bnclient.__all__)


def test_every_exception_the_sdk_can_raise_is_exported() -> None:
    raised = {cls for cls in vars(errors).values() if isinstance(cls, type)}
    raised = {cls for cls in raised if issubclass(cls, errors.ServiceError)}
    for code in grpc.StatusCode:
        raised.add(type(errors.from_rpc_error(_Failed(code))))
    for cls in raised:
        assert cls.__name__ in bnclient.__all__, cls
        assert getattr(bnclient, cls.__name__) is cls


class _Failed(grpc.RpcError, grpc.Call):  # type: ignore[misc]
    """A failed call with a given status (just what from_rpc_error reads)."""

    def __init__(self, code: grpc.StatusCode) -> None:
        self._code = code

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return "details"

    def initial_metadata(self):  # pragma: no cover - grpc.Call's abstract interface
        return ()

    def trailing_metadata(self):  # pragma: no cover
        return ()

    def is_active(self) -> bool:  # pragma: no cover
        return False

    def time_remaining(self):  # pragma: no cover
        return None

    def cancel(self) -> bool:  # pragma: no cover
        return False

    def add_callback(self, callback) -> bool:  # pragma: no cover
        return False


def _public_callables(module: types.ModuleType):
    for name in module.__all__:
        value = getattr(module, name)
        yield f"{module.__name__}.{name}", value
        if isinstance(value, type):
            for attr, member in vars(value).items():
                if attr.startswith("_") and attr != "__init__":
                    continue
                if isinstance(member, property):
                    member = member.fget
                if callable(member):
                    yield f"{module.__name__}.{name}.{attr}", member


def test_no_protobuf_type_in_public_signatures() -> None:
    for module in (bnclient, bnclient.torch):
        for where, value in _public_callables(module):
            target = value.__init__ if isinstance(value, type) else value
            try:
                annotations = inspect.get_annotations(target, eval_str=False)
            except TypeError:
                continue
            for arg, annotation in annotations.items():
                text = annotation if isinstance(annotation, str) else repr(annotation)
                assert "pb." not in text and "bnservice" not in text, (where, arg, text)


def test_importing_bnclient_does_not_import_torch() -> None:
    import subprocess
    import sys

    code = "import sys, bnclient; print('torch' in sys.modules)"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert run.stdout.strip() == "False"
