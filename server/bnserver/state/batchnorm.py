"""BatchNorm module objects: MegEngine's `_BatchNorm` semantics over the kernel.

A module owns its config, parameters, running statistics, training flag and
two kinds of lock. State arrays are float32 of shape (C,) internally and are
reported in MegEngine's (1, C, 1, 1) shape. Every method validates everything
before it changes anything, so a failed call leaves the module exactly as it
was.

One class serves BatchNorm1d/2d and SyncBatchNorm: a forward or backward runs
inside a `bnserver.sync.step.Step`, which for a SyncBatchNorm rank merges the
statistics with its peers' and for the others returns them as they are.

Locks: `lock` guards the state and is held only to read parameters and apply
a result, never while computing or waiting; `step_locks` (one per phase) are
taken by a SyncBatchNorm rank's step and serialize its rounds. So GetState,
LoadState, resets and snapshots never wait on the network.

Corrections to the reference: a training batch with one value per channel, a
batch with non-finite statistics, a wrong channel count and a wrong input rank
are rejected with InvalidArgument; freeze works on 2-D and 3-D input.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace

import numpy as np

from bnserver.core import kernel
from bnserver.core.config import ModuleConfig
from bnserver.errors import InvalidArgument
from bnserver.sync.step import Step
from bnserver.sync.ticket import Contribution, Outcome, Phase, RunningState

#: Default seconds a request id is remembered (`--dedup-window`): a retry within it
#: is applied at most once, however many other requests the module sees meanwhile.
DEDUP_WINDOW = 30.0

#: Names of the state entries, in state_dict order.
STATE_KEYS = ("weight", "bias", "running_mean", "running_var")

#: The training-update count, PyTorch's name; an int64 0-d entry where a state
#: dict carries it (present when the module tracks running statistics).
COUNT_KEY = "num_batches_tracked"


@dataclass(frozen=True)
class CallParams:
    """A caller's parameters and mode for one forward (a framework module that owns
    its parameters sends them with each call). None: the module's own.

    weight, bias: float64 (C,), given together and only for an affine module.
    """

    weight: kernel.Vector | None = None
    bias: kernel.Vector | None = None
    training: bool | None = None


@dataclass(frozen=True)
class SavedForBackward:
    """What backward needs from one forward.

    x:        the forward input (N, C, *spatial), kept by reference (read-only).
    mean, inv_std: float64 (C,), the statistics the forward normalized with.
    weight:   float64 (C,) snapshot of the weight at forward time, or None.
    count:    global elements per channel when batch statistics were used
              (their gradient flows into dx), None for running statistics.
    gate:     `kernel.variance_gate` of those statistics (eps_mode "max"), or None.
    """

    module: BatchNorm
    x: np.ndarray
    mean: kernel.Vector
    inv_std: kernel.Vector
    weight: kernel.Vector | None
    count: int | None
    gate: kernel.Vector | None = None

    @property
    def nbytes(self) -> int:
        return self.size_for(self.x)

    @staticmethod
    def size_for(x: np.ndarray) -> int:
        """Bytes a context for input `x` holds: x plus three float64 (C,) vectors."""
        return int(x.nbytes) + 3 * 8 * (x.shape[1] if x.ndim > 1 else 0)


@dataclass(frozen=True)
class Normalization:
    """The statistics a forward normalized with.

    count: global elements per channel for batch statistics, None for running ones.
    mean, inv_std: float64 (C,). gate: see `kernel.variance_gate`.
    """

    count: int | None
    mean: kernel.Vector
    inv_std: kernel.Vector
    gate: kernel.Vector | None = None


@dataclass(frozen=True)
class Applied:
    """A request id's applied forward: when (time.time() seconds, so that it means the
    same after a restart) and, for a SyncBatchNorm, the round's statistics (a retry
    cannot recompute them from its own batch; other modules' retries do)."""

    at: float
    norm: Normalization | None


@dataclass(frozen=True)
class Record:
    """Everything a module holds, as one immutable value: what persistence writes and
    what a change stages before it is published.

    uid: this module's identity (a module deleted and created again has another).
    revision: changes published so far (each write of the module carries it).
    applied: (request id, Applied) pairs, oldest first.
    """

    config: ModuleConfig
    uid: str
    revision: int
    training: bool
    num_batches_tracked: int
    weight: np.ndarray | None
    bias: np.ndarray | None
    running_mean: np.ndarray | None
    running_var: np.ndarray | None
    applied: tuple[tuple[str, Applied], ...] = field(default=())

    def state_dict(self) -> dict[str, np.ndarray]:
        """The present entries, float32 (1, C, 1, 1), in STATE_KEYS order."""
        return {k: _report(v) for k in STATE_KEYS if (v := getattr(self, k)) is not None}


#: Writes a staged record durably before it is published (raises to refuse the change).
Persist = Callable[[Record], None]


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
    num_batches_tracked:       training updates of the running statistics so far
                               (the version a SyncBatchNorm rank compares with its peers).
    training:                  True after creation, as in MegEngine and PyTorch.
    dedup_window:              seconds a request id is remembered.

    Every change is staged as a `Record`, optionally written durably (`persist`),
    and only then published, so a write that fails changes nothing.
    """

    def __init__(self, config: ModuleConfig, dedup_window: float = DEDUP_WINDOW) -> None:
        self.config = config.validate()
        c = config.num_features
        self.dedup_window = dedup_window
        self.uid = secrets.token_hex(8)
        self.revision = 0
        # `lock` guards the state and is held briefly; `commit_lock` serializes changes
        # from staging to publishing (a durable write may sit in between); `step_locks`
        # serialize a SyncBatchNorm rank's rounds.
        self.lock = threading.Lock()
        self.commit_lock = threading.Lock()
        self.step_locks = {phase: threading.Lock() for phase in Phase}
        self.training = True
        self.weight = np.ones(c, np.float32) if config.affine else None
        self.bias = np.zeros(c, np.float32) if config.affine else None
        track = config.track_running_stats
        self.running_mean = np.zeros(c, np.float32) if track else None
        self.running_var = np.ones(c, np.float32) if track else None
        self.num_batches_tracked = 0
        # Training updates made by this process (not persisted): tells callers whether
        # a forward trained.
        self.updates = 0
        # request id -> its applied forward, oldest first
        self._applied: OrderedDict[str, Applied] = OrderedDict()

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

    @staticmethod
    def check_grad(saved: SavedForBackward, grad_out: np.ndarray) -> None:
        """Raise InvalidArgument unless `grad_out` has the forward input's shape and dtype."""
        x = saved.x
        if grad_out.shape != x.shape or grad_out.dtype != x.dtype:
            raise InvalidArgument(
                f"grad_output must match the forward input: expected {x.dtype} {x.shape}, "
                f"got {grad_out.dtype} {grad_out.shape}"
            )

    def uses_batch_stats(self, training: bool | None = None) -> bool:
        """Whether forward normalizes with batch statistics (else running ones), in the
        module's mode or in `training` when given."""
        cfg = self.config
        training = self.training if training is None else training
        return (training and not cfg.freeze) or not cfg.track_running_stats

    def check_params(self, params: CallParams) -> None:
        """Raise InvalidArgument unless a forward's own weight and bias fit this module."""
        if (params.weight is None) != (params.bias is None):
            raise InvalidArgument("a forward's weight and bias are given together or not at all")
        if params.weight is None or params.bias is None:
            return
        if not self.config.affine:
            raise InvalidArgument(f"{self.config.describe()} has no weight and bias (affine=False)")
        c = self.config.num_features
        for key, value in (("weight", params.weight), ("bias", params.bias)):
            if value.shape != (c,):
                raise InvalidArgument(f"{key} must have {c} values, got shape {value.shape}")
            if not np.isfinite(value).all():
                raise InvalidArgument(f"{key} has non-finite values")

    def forward(
        self,
        x: np.ndarray,
        keep_for_backward: bool = False,
        request_id: str = "",
        step: Step | None = None,
        persist: Persist | None = None,
        params: CallParams | None = None,
        out: np.ndarray | None = None,
        persist_mode: Persist | None = None,
    ) -> tuple[np.ndarray, SavedForBackward | None]:
        """Normalize `x` (N, C, *spatial); update running stats when training.

        `out`: where the output goes (x's shape and dtype, may be x itself unless
        backward is kept), else a new array.

        `params` (the caller's weight, bias and mode) are used instead of the
        module's and stored with the forward's result, only if it succeeds: a new
        mode is written with `persist_mode` before it is published, new weights
        with `persist` (given for durable training updates), else in memory.

        Returns the output (same shape and dtype) and, when asked, what
        backward needs. Batch statistics go through `step.reduce` (a
        SyncBatchNorm rank's step merges them with its peers'). A forward
        whose `request_id` was applied within the dedup window (a retry)
        changes nothing and normalizes with the statistics of the first
        attempt, so its output is the same. With `persist`, a training update
        is written durably before it is published; if the write raises,
        nothing changes.
        """
        step = step if step is not None else Step()
        params = params if params is not None else CallParams()
        self.check_input(x)
        self.check_params(params)
        with self.lock:
            training = self.training if params.training is None else params.training
            weight: kernel.Vector | None
            bias: kernel.Vector | None
            if params.weight is not None:
                weight, bias = params.weight, params.bias
            else:
                weight = None if self.weight is None else self.weight.astype(np.float64)
                bias = None if self.bias is None else self.bias.astype(np.float64)
            applied = self._applied.get(request_id) if request_id else None
            batch = self.uses_batch_stats(training)
            update = batch and training and self.config.track_running_stats
            state = self._running_state() if update else None
            running = None if batch else self._running_normalization()
        step.needs_round = batch and applied is None
        if applied is not None:
            # A retry: the first attempt's statistics (a local batch's are its own).
            norm = applied.norm if applied.norm is not None else self._batch_normalization(x)
        elif running is not None:
            norm = running
        else:
            norm = self._batch_step(x, step, state, request_id, persist)
        y = kernel.normalize(x, norm.mean, norm.inv_std, weight, bias, out)
        self._store_params(params, persist_mode, persist)
        saved = None
        if keep_for_backward:
            saved = SavedForBackward(
                self, x, norm.mean, norm.inv_std, weight, norm.count, norm.gate
            )
        return y, saved

    def _batch_step(
        self,
        x: np.ndarray,
        step: Step,
        state: RunningState | None,
        request_id: str,
        persist: Persist | None,
    ) -> Normalization:
        """Reduce this batch's statistics through `step`; apply the update if training."""
        local = kernel.moments(x)
        outcome = step.reduce(Contribution(local.count, (local.mean, local.m2), state))
        stats = checked(kernel.Moments(outcome.count, *outcome.vectors))
        norm = self._normalization(stats)
        sync = self.config.sync is not None
        # A sync round without an update is remembered too: a retry of it must not
        # start a round its peers will never join.
        remember = bool(request_id) and (state is not None or sync)
        if state is None and not remember:
            return norm
        entry = Applied(time.time(), norm if sync else None)
        with self.commit_lock:
            with self.lock:
                committed = self._applied.get(request_id) if request_id else None
                if committed is not None:  # a concurrent attempt of this request got here
                    return committed.norm if committed.norm is not None else norm
                running = self._next_state(stats, outcome) if state is not None else None
                base = self._record() if persist is not None else None
                if base is None:
                    self._publish_update(running, request_id if remember else "", entry)
                    return norm
            # Write, then publish; readers are not held up by the write.
            staged = replace(base, revision=base.revision + 1)
            if running is not None:
                mean, var, batches = running
                staged = replace(
                    staged, running_mean=mean, running_var=var, num_batches_tracked=batches
                )
            if remember:
                staged = replace(staged, applied=(*staged.applied, (request_id, entry)))
            assert persist is not None
            persist(staged)
            with self.lock:
                self._publish_update(running, request_id if remember else "", entry)
        return norm

    def _store_params(
        self, params: CallParams, persist_mode: Persist | None, persist: Persist | None
    ) -> None:
        """Keep a successful forward's own weight, bias and mode: staged, written (a new
        mode when `persist_mode` is given, weights when `persist` is), then published;
        without a write they are published in memory."""
        if params.weight is None and params.training is None:
            return
        with self.commit_lock:
            with self.lock:
                new_mode = params.training is not None and params.training != self.training
                write = persist_mode if new_mode else persist
                if write is None:
                    if params.weight is not None and params.bias is not None:
                        self.weight = params.weight.astype(np.float32)
                        self.bias = params.bias.astype(np.float32)
                    if params.training is not None:
                        self.training = params.training
                    self.revision += 1
                    return
                staged = self._record()
            staged = replace(staged, revision=staged.revision + 1)
            if params.weight is not None and params.bias is not None:
                weight, bias = params.weight.astype(np.float32), params.bias.astype(np.float32)
                staged = replace(staged, weight=weight, bias=bias)
            if params.training is not None:
                staged = replace(staged, training=params.training)
            write(staged)
            self.publish(staged)

    def running_stats(self) -> dict[str, np.ndarray]:
        """running_mean and running_var, float32 (1, C, 1, 1), and num_batches_tracked
        (int64 0-d), read together; empty without track_running_stats."""
        with self.lock:
            if self.running_mean is None or self.running_var is None:
                return {}
            return {
                "running_mean": _report(self.running_mean),
                "running_var": _report(self.running_var),
                COUNT_KEY: np.array(self.num_batches_tracked, np.int64),
            }

    def _normalization(self, stats: kernel.Moments) -> Normalization:
        mode = self._eps_mode()
        return Normalization(
            stats.count,
            stats.mean,
            kernel.inv_std(stats.var, self.config.eps, mode),
            kernel.variance_gate(stats.var, self.config.eps, mode),
        )

    def _batch_normalization(self, x: np.ndarray) -> Normalization:
        """The statistics of `x` alone (a retried local forward: the same as the first's)."""
        return self._normalization(checked(kernel.moments(x)))

    def _next_state(
        self, stats: kernel.Moments, outcome: Outcome
    ) -> tuple[np.ndarray, np.ndarray, int]:
        """(running_mean, running_var, num_batches_tracked) after this round (caller holds
        the lock). A rank whose state differs from the round's reference starts from
        the reference, so every rank of the round ends bit-identical."""
        base = self._running_state()
        ref = outcome.reference
        if ref is not None and not base.same_as(ref):
            base = ref
        mean, var = self._next_running_stats(stats, base.mean, base.var, base.version + 1)
        return mean, var, base.version + 1

    def _publish_update(
        self, running: tuple[np.ndarray, np.ndarray, int] | None, request_id: str, entry: Applied
    ) -> None:
        """Publish a training update and remember its request id (caller holds the lock)."""
        if running is not None:
            self.running_mean, self.running_var, self.num_batches_tracked = running
            self.updates += 1
        if request_id:
            self._applied[request_id] = entry
        self._forget_old(entry.at)
        self.revision += 1

    def _forget_old(self, now: float) -> None:
        """Drop request ids older than the dedup window (caller holds the lock)."""
        horizon = now - self.dedup_window
        while self._applied:
            oldest = next(iter(self._applied.values()))
            if oldest.at >= horizon:
                break
            self._applied.popitem(last=False)

    def _running_state(self) -> RunningState:
        """This module's running statistics as a RunningState (caller holds the lock)."""
        assert self.running_mean is not None and self.running_var is not None
        return RunningState(self.num_batches_tracked, self.running_mean, self.running_var)

    def _running_normalization(self) -> Normalization:
        """Normalization by the running statistics (caller holds the lock)."""
        assert self.running_mean is not None and self.running_var is not None
        running_var = self.running_var.astype(np.float64)
        inv_std = kernel.inv_std(running_var, self.config.eps, self._eps_mode())
        return Normalization(None, self.running_mean.astype(np.float64), inv_std)

    def backward(
        self,
        saved: SavedForBackward,
        grad_out: np.ndarray,
        step: Step | None = None,
        out: np.ndarray | None = None,
    ) -> Gradients:
        """Gradients of the forward that produced `saved`, for upstream gradient `grad_out`.

        `out`: where dx goes (grad_out's shape and dtype, may be grad_out itself).

        With batch statistics the sums (sum(dy), sum(dy * xhat)) go through
        `step.reduce`; dweight and dbias stay local, as in MegEngine.
        """
        step = step if step is not None else Step()
        step.needs_round = saved.count is not None
        self.check_grad(saved, grad_out)
        x = saved.x
        sum_dy, sum_dy_xhat = kernel.grad_sums(x, grad_out, saved.mean, saved.inv_std)
        batch_terms = None
        if saved.count is not None:
            total = step.reduce(Contribution(0, (sum_dy, sum_dy_xhat)))
            batch_terms = (saved.count, total.vectors[0], total.vectors[1])
        dx = kernel.grad_input(
            x, grad_out, saved.mean, saved.inv_std, saved.weight, batch_terms, saved.gate, out
        )
        if not self.config.affine or self.config.freeze:
            return Gradients(dx, None, None)
        return Gradients(dx, _report(sum_dy_xhat), _report(sum_dy))

    def _eps_mode(self) -> kernel.EpsMode:
        sync = self.config.sync
        return "max" if sync is not None and sync.eps_mode == "max" else "additive"

    def _next_running_stats(
        self,
        stats: kernel.Moments,
        running_mean: np.ndarray,
        running_var: np.ndarray,
        batches: int,
    ) -> tuple[np.ndarray, np.ndarray]:
        """float32 (C,) running stats after blending `stats` into the given ones as the
        `batches`-th update; InvalidArgument if they overflow."""
        momentum = self.config.momentum
        # momentum None (PyTorch's cumulative average): the batch weighs 1/batches.
        m = np.float64(1.0 - 1.0 / batches if momentum is None else momentum)
        # float64 blend, one rounding to float32 (MegEngine blends in float32). A float64
        # scalar times the float32 state computes in float64.
        mean = running_mean * m
        mean += stats.mean * (1 - m)
        var = running_var * m
        var += stats.m2 * ((1 - m) / (stats.count - 1))
        # Both round to finite float32 iff below FLOAT32_OVERFLOW (NaN compares false).
        limit = kernel.FLOAT32_OVERFLOW
        if not (np.abs(mean).max() < limit and var.max() < limit):
            raise InvalidArgument(
                "the batch's statistics overflow the float32 running statistics "
                "(values too large); the batch was rejected and nothing changed"
            )
        return mean.astype(np.float32), var.astype(np.float32)

    # -- state: read, stage, publish ---------------------------------------------

    def record(self) -> Record:
        """The module's whole state as one immutable Record (read under the lock)."""
        with self.lock:
            return self._record()

    def _record(self) -> Record:
        """`record()` for a caller that holds the lock."""
        self._forget_old(time.time())
        return Record(
            self.config,
            self.uid,
            self.revision,
            self.training,
            self.num_batches_tracked,
            self.weight,
            self.bias,
            self.running_mean,
            self.running_var,
            tuple(self._applied.items()),
        )

    def publish(self, record: Record) -> None:
        """Make `record` the module's state (a change already staged, and written)."""
        with self.lock:
            self.training = record.training
            self.num_batches_tracked = record.num_batches_tracked
            self.weight, self.bias = record.weight, record.bias
            self.running_mean, self.running_var = record.running_mean, record.running_var
            self._applied = OrderedDict(record.applied)
            self.revision = record.revision

    def restore(self, record: Record) -> None:
        """Take a record read from disk: its state and its identity (start-up only)."""
        self.uid = record.uid
        self.publish(record)

    def staged(self, change: Callable[[Record], Record]) -> Record:
        """The record after `change` (validation errors raise here; nothing changes)."""
        base = self.record()
        return replace(change(base), revision=base.revision + 1)

    def commit(self, change: Callable[[Record], Record], persist: Persist | None = None) -> None:
        """Stage `change`, write it with `persist` (if given), then publish it."""
        with self.commit_lock:
            record = self.staged(change)
            if persist is not None:
                persist(record)
            self.publish(record)

    def snapshot(self) -> tuple[bool, int, dict[str, np.ndarray]]:
        """(training, num_batches_tracked, state_dict()) read together, under the lock
        (without copying the dedup window, as `record()` does)."""
        with self.lock:
            state = {k: _report(v) for k in STATE_KEYS if (v := getattr(self, k)) is not None}
            return self.training, self.num_batches_tracked, state

    def state_dict(self) -> dict[str, np.ndarray]:
        """Copies of the present entries, float32 (1, C, 1, 1), in STATE_KEYS order."""
        return self.snapshot()[2]

    # Each change below is a function of a Record (staged by `commit`), and a method
    # applying it in memory (what the unit tests and a volatile engine use).

    def loaded(
        self, state: Mapping[str, np.ndarray], strict: bool = True
    ) -> Callable[[Record], Record]:
        """The change that loads (1, C, 1, 1) or (C,) arrays of any float dtype.

        Unknown or absent-on-this-module keys are rejected; with `strict`, every
        present entry must be given. Values must be finite and running_var >= 0.
        `num_batches_tracked` (an integer >= 0, for modules that track running
        statistics) may be given too, strict or not; absent, it stays as it is.
        Validation happens here, before anything is staged.
        """
        present = [k for k in STATE_KEYS if getattr(self, k) is not None]
        state = dict(state)
        batches = self._staged_count(state.pop(COUNT_KEY, None))
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

        def change(record: Record) -> Record:
            record = replace(record, **staged)  # type: ignore[arg-type]
            if batches is not None:
                record = replace(record, num_batches_tracked=batches)
            return record

        return change

    def _staged_count(self, value: np.ndarray | None) -> int | None:
        """A num_batches_tracked entry as an int, or InvalidArgument."""
        if value is None:
            return None
        if not self.config.track_running_stats:
            raise InvalidArgument(
                f"unexpected state entry {COUNT_KEY!r} for {self.config.describe()} "
                f"(it tracks no running statistics)"
            )
        array = np.asarray(value)
        if array.size != 1 or array.dtype.kind not in "iu":
            raise InvalidArgument(f"{COUNT_KEY!r} must be one integer, got {array.dtype}")
        count = int(array.reshape(()))
        if count < 0:
            raise InvalidArgument(f"{COUNT_KEY!r} must be >= 0, got {count}")
        return count

    @staticmethod
    def running_stats_reset(record: Record) -> Record:
        """running_mean to zeros, running_var to ones (if tracked), num_batches_tracked 0."""
        if record.running_mean is None:
            return replace(record, num_batches_tracked=0)
        return replace(
            record,
            running_mean=np.zeros_like(record.running_mean),
            running_var=np.ones_like(record.running_mean),
            num_batches_tracked=0,
        )

    @staticmethod
    def parameters_reset(record: Record) -> Record:
        """running_stats_reset, then weight to ones and bias to zeros (if affine)."""
        record = BatchNorm.running_stats_reset(record)
        if record.weight is None:
            return record
        return replace(
            record, weight=np.ones_like(record.weight), bias=np.zeros_like(record.weight)
        )

    @staticmethod
    def mode_set(training: bool) -> Callable[[Record], Record]:
        return lambda record: replace(record, training=training)

    def load_state_dict(self, state: Mapping[str, np.ndarray], strict: bool = True) -> None:
        self.commit(self.loaded(state, strict))

    def reset_running_stats(self) -> None:
        self.commit(self.running_stats_reset)

    def reset_parameters(self) -> None:
        self.commit(self.parameters_reset)

    def set_training(self, training: bool) -> None:
        self.commit(self.mode_set(training))


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
