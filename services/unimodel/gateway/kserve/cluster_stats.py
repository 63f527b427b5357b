"""KServe model statistics of the whole cluster, not of the one gateway a client happens to reach.

Triton keeps statistics per server; behind a load balancer a client would see whichever gateway replica it hit
(perf_analyzer reads them before and after a run and would count a share of its own requests). So every gateway
answers requests on subjects.GATEWAY_STATS with its own statistics (Triton's ModelStatisticsResponse, every model
it has counted), and the gateway asked for statistics sends one such request and adds up the answers of every
gateway registered in etcd, itself included (they answer within GATHER_S; a gateway that does not is left out
of that answer, and the merge says how many answered). Each gateway keeps counting only what it served: nothing
is stored twice, and the sum is over processes that exist now (a gateway that stopped takes its counts with it,
as a Triton server's restart does).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping

from nats.aio.msg import Msg
from tritonclient.grpc import service_pb2

from unimodel.core import subjects
from unimodel.core.bus import CONNECTION_ERRORS, Bus
from unimodel.gateway.kserve import documents
from unimodel.gateway.statistics import EMPTY, MergedStats, ModelSnapshot, ModelStatistics, combine

log = logging.getLogger(__name__)
GATHER_S = 0.5
"""How long the gathering gateway waits for the others' answers (they answer from memory, in microseconds)."""


def encode(stats: ModelStatistics) -> bytes:
    """This gateway's statistics of every model it counted, as Triton's ModelStatisticsResponse (versions left
    empty: the gathering gateway names them from its own view of the configs)."""
    entries = [documents.statistics_entry(name, "", stats.snapshot(name)) for name in stats.models()]
    return documents.statistics_proto(entries).SerializeToString()


def decode(data: bytes) -> dict[str, ModelSnapshot]:
    return {entry.name: documents.snapshot_of(entry) for entry in service_pb2.ModelStatisticsResponse.FromString(data).model_stats}


def merge(parts: Iterable[Mapping[str, ModelSnapshot]]) -> dict[str, ModelSnapshot]:
    total: dict[str, ModelSnapshot] = {}
    for part in parts:
        for name, snap in part.items():
            total[name] = combine(total.get(name, EMPTY), snap)
    return total


class ClusterStatistics:
    """Answers other gateways with this one's statistics; gathers everyone's."""

    def __init__(self, bus: Bus, local: ModelStatistics, gateways: Callable[[], int]) -> None:
        self.bus, self.local, self.gateways = bus, local, gateways  # gateways: how many are registered

    async def start(self) -> None:
        """Subscribe (plainly: every gateway answers) once the bus is connected."""
        await self.bus.subscribe(subjects.GATEWAY_STATS, self._on_request)

    async def _on_request(self, msg: Msg) -> None:
        if msg.reply:
            try:
                await self.bus.client().publish(msg.reply, encode(self.local))
            except CONNECTION_ERRORS:
                pass  # the gatherer goes on without this gateway

    async def gather(self, timeout_s: float = GATHER_S) -> MergedStats:
        """Every registered gateway's statistics added up; this gateway's own when NATS is down."""
        expected = max(1, self.gateways())
        nc = self.bus.client()
        parts: list[dict[str, ModelSnapshot]] = []
        try:
            inbox = nc.new_inbox()
            sub = await nc.subscribe(inbox)
            try:
                await nc.publish(subjects.GATEWAY_STATS, b"", reply=inbox)
                deadline = time.monotonic() + timeout_s
                while len(parts) < expected and (left := deadline - time.monotonic()) > 0:
                    try:
                        msg = await sub.next_msg(timeout=left)
                    except TimeoutError:
                        break
                    parts.append(decode(msg.data))
            finally:
                await sub.unsubscribe()
        except (TimeoutError, *CONNECTION_ERRORS) as exc:
            log.debug("statistics of this gateway only: %s", exc)
        if not parts:
            own = {name: self.local.snapshot(name) for name in self.local.models()}
            return MergedStats(own, 1, expected)
        return MergedStats(merge(parts), len(parts), expected)
