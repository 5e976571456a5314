"""The gRPC health-checking protocol (`grpc.health.v1.Health`) on the API's port.

Load balancers (Envoy's gRPC health check), Kubernetes' gRPC probes and grpc_health_probe
ask `Check` whether a server can serve, in any protocol of the Connect family. The answer is
/readyz's: SERVING when PostgreSQL and Redis answer, NOT_SERVING when one does not (or the
process is still starting), for the server as a whole (`service` empty) and for
`coupon.v1.CouponService`; NOT_FOUND for any other service, as the protocol asks. It is
public, as /readyz is: it reveals nothing but whether the process can serve.

`Watch` is answered UNIMPLEMENTED, which the protocol's clients read as a server that does
not watch: a stream per watching client, re-checked for as long as it stays open, would
hold a PostgreSQL and a Redis round trip every few seconds for each of them.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

from connectrpc.code import Code
from connectrpc.errors import ConnectError
from connectrpc.request import RequestContext

from coupon.entrypoints.health import Readiness
from coupon.gen.coupon.v1 import coupon_pb
from coupon.gen.grpc.health.v1.health_pb import HealthCheckRequest, HealthCheckResponse

SERVED = frozenset({"", coupon_pb.desc().services[0].type_name})

Status = HealthCheckResponse.ServingStatus


class HealthService:
    def __init__(self, readiness: Callable[[], Readiness | None]) -> None:
        self._readiness = readiness

    async def check(
        self,
        request: HealthCheckRequest,
        ctx: RequestContext[HealthCheckRequest, HealthCheckResponse],
        /,
    ) -> HealthCheckResponse:
        if request.service not in SERVED:
            served = " or ".join(repr(name) for name in sorted(SERVED))
            raise ConnectError(
                Code.NOT_FOUND,
                f"service: {request.service!r} is not served here (ask for {served})",
            )
        readiness = self._readiness()
        ready = readiness is not None and (await readiness.check())[0]
        return HealthCheckResponse(status=Status.SERVING if ready else Status.NOT_SERVING)

    def watch(
        self,
        request: HealthCheckRequest,
        ctx: RequestContext[HealthCheckRequest, HealthCheckResponse],
        /,
    ) -> AsyncIterator[HealthCheckResponse]:
        raise ConnectError(Code.UNIMPLEMENTED, "Watch is not served here; call Check")
