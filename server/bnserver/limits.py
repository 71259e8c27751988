"""Size and count limits of a server; exceeding one is RESOURCE_EXHAUSTED naming its flag."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from bnserver.errors import ResourceExhausted


@dataclass(frozen=True)
class Limits:
    """Each field is the `bnserver serve` flag of the same name (underscores as dashes)."""

    max_request_bytes: int = 8 << 30  # one call's tensor bytes (unary calls stop at 2 GiB)
    max_tensor_elements: int = 1 << 31
    max_num_features: int = 1 << 20
    max_modules: int = 10_000  # per tenant
    max_state_bytes: int = 8 << 30  # module state, the whole server
    max_tenant_state_bytes: int = 2 << 30  # module state, per tenant
    max_backward_handles: int = 64  # per tenant
    max_backward_bytes: int = 2 << 30  # per tenant

    def check_tensor(self, shape: Sequence[int], nbytes: int) -> None:
        """Raise ResourceExhausted if a declared tensor is over a limit (before allocating)."""
        elements = math.prod(shape)
        if elements > self.max_tensor_elements:
            raise ResourceExhausted(
                f"tensor of {elements} elements is over the limit of {self.max_tensor_elements} "
                f"(--max-tensor-elements)"
            )
        if nbytes > self.max_request_bytes:
            raise ResourceExhausted(
                f"tensor of {nbytes} bytes is over the limit of {self.max_request_bytes} bytes "
                f"(--max-request-bytes)"
            )

    def check_num_features(self, num_features: int) -> None:
        if num_features > self.max_num_features:
            raise ResourceExhausted(
                f"num_features {num_features} is over the limit of {self.max_num_features} "
                f"(--max-num-features)"
            )
