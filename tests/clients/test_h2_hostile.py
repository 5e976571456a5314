"""HTTP/2 against a hostile peer, frame by frame, on a real server process: what one
connection does wrong must end at most that connection (or that stream), never a worker's
other clients' calls."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from h2.errors import ErrorCodes
from hyperframe.frame import HeadersFrame, RstStreamFrame

from coupon.gen.coupon.v1 import coupon_pb
from harness.client import in_seconds
from harness.server import ServerProcess
from tests.clients.h2client import H2Client, grpc_frame, grpc_headers

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    proc = ServerProcess(env={}, in_memory=True, log_dir=tmp_path_factory.mktemp("h2-hostile"))
    try:
        proc.wait_ready()
        yield proc
    finally:
        proc.stop()


def create_campaign(client: H2Client) -> str:
    response = client.call(
        "CreateCampaign",
        coupon_pb.CreateCampaignRequest(
            name="hostile", total_coupons=10, starts_at=in_seconds(-60)
        ),
        coupon_pb.CreateCampaignResponse,
    )
    assert response.campaign is not None
    return response.campaign.id


def get_campaign(campaign_id: str) -> bytes:
    return grpc_frame(coupon_pb.GetCampaignRequest(campaign_id=campaign_id))


def reset_frame(stream_id: int) -> bytes:
    frame = RstStreamFrame(stream_id)
    frame.error_code = ErrorCodes.CANCEL
    return frame.serialize()


def raw_request(client: H2Client, stream_id: int, *extra: tuple[bytes, bytes]) -> HeadersFrame:
    """A GetCampaign's HEADERS, `extra` fields after the usual ones, past h2's checks."""
    headers = grpc_headers("GetCampaign", (b"te", b"trailers"), *extra)
    frame = HeadersFrame(stream_id, client.conn.encoder.encode(headers))
    frame.flags.add("END_HEADERS")
    return frame


def no_goaway_and_serving(server: ServerProcess, client: H2Client, campaign_id: str) -> None:
    assert client.goaway is None
    answer = client.call(
        "GetCampaign",
        coupon_pb.GetCampaignRequest(campaign_id=campaign_id),
        coupon_pb.GetCampaignResponse,
    )
    assert answer.campaign is not None
    assert "Traceback" not in server.log()


def test_a_malformed_request_reset_by_its_peer_in_the_same_read_ends_that_stream_alone(
    server: ServerProcess,
) -> None:
    """A malformed request and the peer's own RST_STREAM for it, in one write: h2 has closed
    the stream by the time the request is seen, so the server's reset is no more needed;
    the connection and the stream open beside it go on."""
    with H2Client(server.port) as client:
        campaign_id = create_campaign(client)
        beside = client.start("GetCampaign", end=False)
        bad = client.conn.get_next_available_stream_id()
        frame = raw_request(client, bad, (b"X-Upper", b"1"))
        frame.flags.add("END_STREAM")
        # Past h2's state machine: h2 (client side) would not send on a stream it never opened.
        client.conn.highest_outbound_stream_id = bad
        client.sock.sendall(frame.serialize() + reset_frame(bad))
        client.send(beside, get_campaign(campaign_id))
        [answered] = client.wait(beside)
        assert answered.grpc_status == b"0", answered
        no_goaway_and_serving(server, client, campaign_id)
