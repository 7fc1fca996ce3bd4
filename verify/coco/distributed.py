"""torch.distributed for tools that split a list of work items over ranks.

Launched by ``torchrun`` (or any launcher that sets the env:// variables RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR and MASTER_PORT), every rank runs the same program: :meth:`RankGroup.from_env`
says which rank this process is, :func:`process_group` joins the others (gloo on CPU, nccl on
CUDA with this rank on device LOCAL_RANK) and leaves again at the end, :meth:`RankGroup.shard`
gives this rank its deterministic share of the items, and :meth:`RankGroup.gather_to_root`
brings the per-rank results to rank 0.

Failures are agreed on, never waited out: ranks call :meth:`RankGroup.agree` at the same
points (after each step of work), passing their own exception if they hit one; if any rank
failed, every rank raises :class:`RanksFailed` there, so no rank is left waiting in a collective
for a peer that has stopped. Without WORLD_SIZE (or with WORLD_SIZE=1) the group is a single
process and nothing is initialised: the same code runs unchanged.

Nothing here knows about COCO; training reuses it for its own data sharding.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")

# Longest a rank waits in one collective for the others. Work is agreed on step by step, so a
# wait is about one step of the slowest rank (a batch, loading a model), far below this.
COLLECTIVE_TIMEOUT = timedelta(minutes=30)

Describe = Callable[[BaseException], tuple[int, str]]


class DistributedSetupError(Exception):
    """The launcher's environment variables are missing, malformed or inconsistent."""


@dataclass(frozen=True)
class RankFailure:
    """What one rank reported when it failed: its exit code and a one-line message."""

    rank: int
    exit_code: int
    message: str


class RanksFailed(Exception):
    """One or more ranks failed at an agreement point; raised on every rank alike.

    ``failures`` are ordered by rank; the first one decides the exit code.
    """

    def __init__(self, failures: Sequence[RankFailure], world_size: int) -> None:
        self.failures = tuple(failures)
        self.world_size = world_size
        first = self.failures[0]
        others = len(self.failures) - 1
        more = f" ({others} other rank(s) failed too)" if others else ""
        super().__init__(f"rank {first.rank} of {world_size}: {first.message}{more}")

    @property
    def exit_code(self) -> int:
        return self.failures[0].exit_code


def describe_failure(error: BaseException) -> tuple[int, str]:
    """Default (exit code, message) of a failed rank: 130 for Ctrl-C, else 1 with the error."""
    if isinstance(error, KeyboardInterrupt):
        return 130, "interrupted"
    return 1, f"{type(error).__name__}: {error}"


def shard(items: Sequence[T], rank: int, world_size: int) -> list[T]:
    """Rank ``rank``'s share of ``items``: every ``world_size``-th item starting at ``rank``.

    Deterministic (the same items, rank and world size give the same shard), disjoint, together
    complete, and balanced to within one item; interleaving also spreads any ordering of the
    items (e.g. image ids grouped by size) evenly over the ranks.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside [0, {world_size})")
    return list(items[rank::world_size])


def _env_int(environ: Mapping[str, str], name: str) -> int:
    value = environ.get(name)
    if value is None:
        raise DistributedSetupError(f"WORLD_SIZE is set but {name} is not; launch with torchrun")
    try:
        return int(value)
    except ValueError:
        raise DistributedSetupError(f"{name}={value!r} is not an integer") from None


@dataclass(frozen=True)
class RankGroup:
    """This process's place among the ranks, and the few collectives the tools need.

    ``describe`` turns a rank's exception into the (exit code, message) the other ranks see.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    describe: Describe = field(default=describe_failure, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise DistributedSetupError(f"RANK={self.rank} is outside [0, WORLD_SIZE={self.world_size})")
        if self.local_rank < 0:
            raise DistributedSetupError(f"LOCAL_RANK={self.local_rank} is negative")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None,
                 describe: Describe = describe_failure) -> RankGroup:
        """The group described by RANK / WORLD_SIZE / LOCAL_RANK; one process when WORLD_SIZE is unset."""
        environ = os.environ if environ is None else environ
        if "WORLD_SIZE" not in environ:
            return cls(describe=describe)
        world_size = _env_int(environ, "WORLD_SIZE")
        if world_size == 1:
            return cls(describe=describe)
        return cls(_env_int(environ, "RANK"), world_size, _env_int(environ, "LOCAL_RANK"), describe)

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_root(self) -> bool:
        return self.rank == 0

    def shard(self, items: Sequence[T]) -> list[T]:
        """This rank's share of ``items`` (see :func:`shard`)."""
        return shard(items, self.rank, self.world_size)

    def exchange(self, value: Any) -> list[Any]:
        """Every rank's ``value`` (picklable), ordered by rank, on every rank."""
        if not self.is_distributed:
            return [value]
        values: list[Any] = [None] * self.world_size
        dist.all_gather_object(values, value)
        return values

    def gather_to_root(self, value: Any) -> list[Any] | None:
        """Every rank's ``value`` (picklable), ordered by rank, on rank 0; None on the others."""
        if not self.is_distributed:
            return [value]
        values: list[Any] | None = [None] * self.world_size if self.is_root else None
        dist.gather_object(value, values, dst=0)
        return values

    def barrier(self) -> None:
        """Wait until every rank has got here."""
        self.exchange(None)

    def agree(self, error: BaseException | None = None, *, work: int = 0) -> int:
        """An agreement point: returns the sum of ``work`` over the ranks if no rank failed.

        Every rank must call it at the same point, with the exception it hit (if any). One
        process: re-raises ``error``. Several: raises :class:`RanksFailed` (from ``error`` on
        the ranks that failed) on every rank if any rank failed.
        """
        if not self.is_distributed:
            if error is not None:
                raise error
            return work
        report = None if error is None else RankFailure(self.rank, *self.describe(error))
        reports = self.exchange((work, report))
        failures = [failure for _, failure in reports if failure is not None]
        if failures:
            raise RanksFailed(failures, self.world_size) from error
        return sum(done for done, _ in reports)

    @contextlib.contextmanager
    def agreed(self) -> Iterator[None]:
        """Run a block of work, then :meth:`agree` on whether it failed on any rank."""
        try:
            yield
        except BaseException as error:  # noqa: BLE001 - every failure is shared, then re-raised
            self.agree(error)
            raise
        self.agree()


def backend_for(device: torch.device) -> str:
    """nccl for CUDA devices, gloo otherwise."""
    return "nccl" if device.type == "cuda" else "gloo"


def rank_device(group: RankGroup, requested: str | None) -> torch.device:
    """This rank's torch device: ``cuda:LOCAL_RANK`` for cuda (or for None when CUDA is available
    and the group is distributed), else ``cpu``. One process keeps ``cuda`` on the current device."""
    wants_cuda = (requested or "").startswith("cuda") or \
        (requested is None and torch.cuda.is_available())
    if not wants_cuda:
        return torch.device("cpu")
    if not group.is_distributed:
        return torch.device(requested or "cuda")   # 'cuda' or an explicit 'cuda:N'

    count = torch.cuda.device_count()
    if group.local_rank >= count:
        raise DistributedSetupError(f"LOCAL_RANK={group.local_rank} but this node has {count} CUDA "
                                    "device(s); start at most one process per device")
    return torch.device("cuda", group.local_rank)


@contextlib.contextmanager
def process_group(group: RankGroup, device: torch.device,
                  timeout: timedelta = COLLECTIVE_TIMEOUT) -> Iterator[RankGroup]:
    """Join the process group (env:// initialisation) for the block and destroy it afterwards.

    A CUDA ``device`` becomes this rank's current device and the backend is nccl; otherwise
    gloo. A single-process group initialises nothing.
    """
    if not group.is_distributed:
        yield group
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend_for(device), init_method="env://", rank=group.rank,
                            world_size=group.world_size, timeout=timeout)
    try:
        yield group
    finally:
        dist.destroy_process_group()
