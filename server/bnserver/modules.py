"""BatchNorm module objects: MegEngine's `_BatchNorm` semantics over the kernel.

A module owns its config, parameters, running statistics, training flag and a
lock. State arrays are float32 of shape (C,) internally and are reported in
MegEngine's (1, C, 1, 1) shape. Every method validates everything before it
changes anything, so a failed call leaves the module exactly as it was.

Corrections to the reference (DESIGN.md section 3): a training batch with one
value per channel, a batch with non-finite statistics, a wrong channel count
and a wrong input rank are rejected with InvalidArgument; freeze works on 2-D
and 3-D input.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from bnserver import kernel
from bnserver.calls import CallContext
from bnserver.config import ModuleConfig
from bnserver.errors import InvalidArgument

#: Training forwards remembered per module by request id, so that a retry is not
#: applied twice (retries follow their first attempt closely).
APPLIED_IDS = 64

#: Names of the state entries, in state_dict order.
STATE_KEYS = ("weight", "bias", "running_mean", "running_var")


@dataclass(frozen=True)
class SavedForBackward:
    """What backward needs from one forward.

    x:        the forward input (N, C, *spatial), kept by reference (read-only).
    mean, inv_std: float64 (C,), the statistics the forward normalized with.
    weight:   float64 (C,) snapshot of the weight at forward time, or None.
    count:    global elements per channel when batch statistics were used
              (their gradient flows into dx), None for running statistics.
    """

    module: BatchNorm
    x: np.ndarray
    mean: kernel.Vector
    inv_std: kernel.Vector
    weight: kernel.Vector | None
    count: int | None

    @property
    def nbytes(self) -> int:
        return self.size_for(self.x)

    @staticmethod
    def size_for(x: np.ndarray) -> int:
        """Bytes a context for input `x` holds: x plus three float64 (C,) vectors."""
        return int(x.nbytes) + 3 * 8 * (x.shape[1] if x.ndim > 1 else 0)


@dataclass(frozen=True)
class Gradients:
    """Backward result: dx like x; dweight, dbias float32 (1, C, 1, 1) or None."""

    grad_input: np.ndarray
    grad_weight: np.ndarray | None
    grad_bias: np.ndarray | None


class BatchNorm:
    """A BatchNorm1d / BatchNorm2d / SyncBatchNorm instance.

    weight, bias:              float32 (C,), present when config.affine.
    running_mean, running_var: float32 (C,), present when config.track_running_stats.
    training:                  True after creation, as in MegEngine and PyTorch.
    """

    def __init__(self, config: ModuleConfig) -> None:
        self.config = config.validate()
        c = config.num_features
        self.lock = threading.Lock()
        self.training = True
        self.weight = np.ones(c, np.float32) if config.affine else None
        self.bias = np.zeros(c, np.float32) if config.affine else None
        track = config.track_running_stats
        self.running_mean = np.zeros(c, np.float32) if track else None
        self.running_var = np.ones(c, np.float32) if track else None
        # Running-stats updates so far: tells callers whether a forward trained.
        self.updates = 0
        # request id -> (count, mean, inv_std) of applied training forwards, oldest first
        self._applied: OrderedDict[str, tuple[int, kernel.Vector, kernel.Vector]] = OrderedDict()

    # -- forward / backward -------------------------------------------------

    def check_input(self, x: np.ndarray) -> None:
        """Raise InvalidArgument unless `x` has an accepted rank and C channels."""
        kind = self.config.kind
        if x.ndim not in kind.input_ndims:
            expected = " or ".join(f"{n}D" for n in kind.input_ndims)
            raise InvalidArgument(
                f"{kind.value} expects {expected} input, got {x.ndim}D input of shape {x.shape}"
            )
        if x.shape[1] != self.config.num_features:
            raise InvalidArgument(
                f"{kind.value}({self.config.num_features}) expects {self.config.num_features} "
                f"channels on axis 1, got input of shape {x.shape}"
            )
        if x.dtype not in (np.float16, np.float32, np.float64):
            raise InvalidArgument(f"input dtype must be float16, float32 or float64, not {x.dtype}")

    def abandon(self, backward: bool, reason: str) -> None:
        """This module's call failed before its computation: tell peers (sync modules only)."""

    @staticmethod
    def check_grad(saved: SavedForBackward, grad_out: np.ndarray) -> None:
        """Raise InvalidArgument unless `grad_out` has the forward input's shape and dtype."""
        x = saved.x
        if grad_out.shape != x.shape or grad_out.dtype != x.dtype:
            raise InvalidArgument(
                f"grad_output must match the forward input: expected {x.dtype} {x.shape}, "
                f"got {grad_out.dtype} {grad_out.shape}"
            )

    def uses_batch_stats(self) -> bool:
        """Whether forward normalizes with batch statistics (else running ones)."""
        cfg = self.config
        return (self.training and not cfg.freeze) or not cfg.track_running_stats

    def forward(
        self,
        x: np.ndarray,
        keep_for_backward: bool = False,
        call: CallContext | None = None,
        request_id: str = "",
    ) -> tuple[np.ndarray, SavedForBackward | None]:
        """Normalize `x` (N, C, *spatial); update running stats when training.

        Returns the output (same shape and dtype) and, when asked, what
        backward needs. `call` tells when the caller gives up; a sync module
        then stops waiting for its peers and withdraws. A training forward
        whose `request_id` was already applied (a retry) changes nothing and
        answers with the statistics of the first attempt, so its output is
        the same.
        """
        self.check_input(x)
        cfg = self.config
        with self.lock:
            weight = None if self.weight is None else self.weight.astype(np.float64)
            bias = None if self.bias is None else self.bias.astype(np.float64)
            applied = self._applied.get(request_id) if request_id else None
            stats = None
            if applied is not None:
                count, mean, inv_std = applied
            elif self.uses_batch_stats():
                stats = self._batch_moments(x, call)
                count, mean = stats.count, stats.mean
                inv_std = kernel.inv_std(stats.var, cfg.eps, self._eps_mode())
            else:
                assert self.running_mean is not None and self.running_var is not None
                count, mean = None, self.running_mean.astype(np.float64)
                running_var = self.running_var.astype(np.float64)
                inv_std = kernel.inv_std(running_var, cfg.eps, self._eps_mode())
            update = stats is not None and self.training and cfg.track_running_stats
            if stats is not None and update:
                running = self._next_running_stats(stats)
            y = kernel.normalize(x, mean, inv_std, weight, bias)
            if stats is not None and update:
                self.running_mean, self.running_var = running
                self.updates += 1
                if request_id:
                    self._remember(request_id, (stats.count, mean, inv_std))
        saved = None
        if keep_for_backward:
            saved = SavedForBackward(self, x, mean, inv_std, weight, count)
        return y, saved

    def _remember(self, request_id: str, applied: tuple[int, kernel.Vector, kernel.Vector]) -> None:
        """Record an applied training forward (caller holds the lock); keep the newest few."""
        self._applied[request_id] = applied
        while len(self._applied) > APPLIED_IDS:
            self._applied.popitem(last=False)

    def backward(
        self,
        saved: SavedForBackward,
        grad_out: np.ndarray,
        call: CallContext | None = None,
    ) -> Gradients:
        """Gradients of the forward that produced `saved`, for upstream gradient `grad_out`."""
        self.check_grad(saved, grad_out)
        x = saved.x
        sum_dy, sum_dy_xhat = kernel.grad_sums(x, grad_out, saved.mean, saved.inv_std)
        batch_terms = None
        if saved.count is not None:
            g_sum_dy, g_sum_dy_xhat = self._global_grad_sums(sum_dy, sum_dy_xhat, call)
            batch_terms = (saved.count, g_sum_dy, g_sum_dy_xhat)
        dx = kernel.grad_input(x, grad_out, saved.mean, saved.inv_std, saved.weight, batch_terms)
        if not self.config.affine or self.config.freeze:
            return Gradients(dx, None, None)
        return Gradients(dx, _report(sum_dy_xhat), _report(sum_dy))

    # -- hooks for SyncBatchNorm -------------------------------------------

    def _eps_mode(self) -> kernel.EpsMode:
        return "additive"

    def _batch_moments(self, x: np.ndarray, call: CallContext | None) -> kernel.Moments:
        """Statistics to normalize with: this batch's (a sync module merges ranks)."""
        return checked(kernel.moments(x))

    def _global_grad_sums(
        self, sum_dy: kernel.Vector, sum_dy_xhat: kernel.Vector, call: CallContext | None
    ) -> tuple[kernel.Vector, kernel.Vector]:
        return sum_dy, sum_dy_xhat

    def _next_running_stats(self, stats: kernel.Moments) -> tuple[np.ndarray, np.ndarray]:
        """The running stats after blending in `stats`; InvalidArgument if they overflow."""
        assert self.running_mean is not None and self.running_var is not None
        m = np.float64(self.config.momentum)
        # float64 blend, one rounding to float32 (MegEngine blends in float32). A float64
        # scalar times the float32 state computes in float64.
        mean = self.running_mean * m
        mean += stats.mean * (1 - m)
        var = self.running_var * m
        var += stats.m2 * ((1 - m) / (stats.count - 1))
        # Both round to finite float32 iff below FLOAT32_OVERFLOW (NaN compares false).
        limit = kernel.FLOAT32_OVERFLOW
        if not (np.abs(mean).max() < limit and var.max() < limit):
            raise InvalidArgument(
                "the batch's statistics overflow the float32 running statistics "
                "(values too large); the batch was rejected and nothing changed"
            )
        return mean.astype(np.float32), var.astype(np.float32)

    # -- state ----------------------------------------------------------------

    def state_dict(self) -> dict[str, np.ndarray]:
        """Copies of the present entries, float32 (1, C, 1, 1), in STATE_KEYS order."""
        with self.lock:
            return {k: _report(v) for k in STATE_KEYS if (v := getattr(self, k)) is not None}

    def load_state_dict(self, state: Mapping[str, np.ndarray], strict: bool = True) -> None:
        """Replace entries from (1, C, 1, 1) or (C,) arrays of any float dtype.

        Unknown or absent-on-this-module keys are rejected; with `strict`, every
        present entry must be given. Values must be finite and running_var >= 0.
        """
        present = [k for k in STATE_KEYS if getattr(self, k) is not None]
        unexpected = sorted(set(state) - set(present))
        if unexpected:
            raise InvalidArgument(
                f"unexpected state entries {unexpected} for {self.config.describe()}; "
                f"it has {present}"
            )
        missing = [k for k in present if k not in state]
        if strict and missing:
            raise InvalidArgument(f"missing state entries {missing} (strict load)")
        c = self.config.num_features
        staged: dict[str, np.ndarray] = {}
        for key, value in state.items():
            value = np.asarray(value)
            if value.shape not in ((1, c, 1, 1), (c,)):
                raise InvalidArgument(
                    f"state entry {key!r} must have shape (1, {c}, 1, 1) or ({c},), "
                    f"got {value.shape}"
                )
            if value.dtype.kind != "f":
                raise InvalidArgument(
                    f"state entry {key!r} must be a float array, not {value.dtype}"
                )
            with np.errstate(over="ignore"):  # too large for float32: caught just below
                vec = value.reshape(c).astype(np.float32)
            if not np.isfinite(vec).all():
                raise InvalidArgument(f"state entry {key!r} has non-finite values")
            if key == "running_var" and (vec < 0).any():
                raise InvalidArgument("state entry 'running_var' has negative values")
            staged[key] = vec
        with self.lock:
            for key, vec in staged.items():
                setattr(self, key, vec)

    def reset_running_stats(self) -> None:
        """running_mean to zeros and running_var to ones (if tracked)."""
        with self.lock:
            if self.running_mean is not None:
                self.running_mean = np.zeros_like(self.running_mean)
                self.running_var = np.ones_like(self.running_mean)

    def reset_parameters(self) -> None:
        """reset_running_stats(), then weight to ones and bias to zeros (if affine)."""
        self.reset_running_stats()
        with self.lock:
            if self.weight is not None:
                self.weight = np.ones_like(self.weight)
                self.bias = np.zeros_like(self.weight)

    def set_training(self, training: bool) -> None:
        with self.lock:
            self.training = training


def checked(stats: kernel.Moments) -> kernel.Moments:
    """Reject batch statistics that cannot normalize or would poison running stats."""
    if stats.count <= 1:
        raise InvalidArgument(
            f"expected more than 1 value per channel when using batch statistics "
            f"(over all ranks for a SyncBatchNorm), got {stats.count}"
        )
    # Fast path: a finite total means finite entries (a total can also overflow, or
    # +inf and -inf cancel to NaN: then the entries are inspected one by one).
    if abs(float(stats.mean.sum()) + float(stats.m2.sum())) < np.inf:
        return stats
    bad = ~(np.isfinite(stats.mean) & np.isfinite(stats.m2))
    if bad.any():
        channels = np.flatnonzero(bad)
        shown = ", ".join(str(c) for c in channels[:8]) + (", ..." if len(channels) > 8 else "")
        raise InvalidArgument(
            f"input has non-finite values (NaN or Inf) in channel(s) {shown}; "
            f"the batch was rejected and nothing changed"
        )
    return stats


def _report(vec: np.ndarray) -> np.ndarray:
    """A float32 (1, C, 1, 1) copy of a (C,) vector, MegEngine's parameter shape."""
    return np.array(vec, dtype=np.float32).reshape(1, -1, 1, 1)
