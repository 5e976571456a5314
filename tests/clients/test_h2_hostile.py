"""HTTP/2 against a hostile peer, frame by frame, on a real server process: what one
connection does wrong must end at most that connection (or that stream), never a worker's
other clients' calls."""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable, Iterator

import pytest
from h2.errors import ErrorCodes
from h2.frame_buffer import FrameBuffer
from hyperframe.frame import (
    DataFrame,
    GoAwayFrame,
    HeadersFrame,
    PingFrame,
    PriorityFrame,
    RstStreamFrame,
    SettingsFrame,
    WindowUpdateFrame,
)

from coupon.gen.coupon.v1 import coupon_pb
from harness.client import in_seconds
from harness.server import ServerProcess
from tests.clients.h2client import H2Client, grpc_frame, grpc_headers, headers_frame

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
        serving(server, campaign_id, client)


def outcomes(client: H2Client, stream_ids: list[int]) -> tuple[dict[int, bytes | int], list[int]]:
    """Read past the client's h2 (which knows nothing of streams sent around it) until each
    stream has its grpc-status (bytes) or RST_STREAM code (int), or a GOAWAY ends the
    connection: what each stream got, and the GOAWAY codes."""
    got: dict[int, bytes | int] = {}
    goaways: list[int] = []
    for frame in client.raw_frames():
        if isinstance(frame, HeadersFrame):
            fields = client.decode(frame)
            if b"grpc-status" in fields:
                got[frame.stream_id] = fields[b"grpc-status"]
        elif isinstance(frame, RstStreamFrame):
            got.setdefault(frame.stream_id, frame.error_code)
        elif isinstance(frame, GoAwayFrame):
            goaways.append(frame.error_code)
            break
        if all(s in got for s in stream_ids):
            break
    return got, goaways


def serving(server: ServerProcess, campaign_id: str, client: H2Client | None = None) -> None:
    """`client`'s connection, told nothing of a GOAWAY, or else another connection, is
    answered, and the server logged no failure of its own."""
    with contextlib.nullcontext(client) if client else H2Client(server.port) as on:
        assert on.goaway is None
        answer = on.call(
            "GetCampaign",
            coupon_pb.GetCampaignRequest(campaign_id=campaign_id),
            coupon_pb.GetCampaignResponse,
        )
    assert answer.campaign is not None
    assert "Traceback" not in server.log()


def test_the_stream_over_the_limit_is_refused_and_the_others_answered(
    server: ServerProcess,
) -> None:
    """RFC 9113, 5.1.2: a stream over SETTINGS_MAX_CONCURRENT_STREAMS is a stream error
    (REFUSED_STREAM), not the end of the connection and of the streams open on it."""
    with H2Client(server.port) as client:
        campaign_id = create_campaign(client)  # the server's SETTINGS read and acknowledged
        opened = [client.start("GetCampaign", end=False) for _ in range(100)]
        extra = opened[-1] + 2
        client.sock.sendall(headers_frame(client, extra, "GetCampaign").serialize())
        for stream_id in opened:
            client.conn.send_data(stream_id, get_campaign(campaign_id), end_stream=True)
        client.flush()
        got, goaways = outcomes(client, [*opened, extra])
    assert goaways == []
    assert got.pop(extra) == ErrorCodes.REFUSED_STREAM
    assert set(got.values()) == {b"0"} and len(got) == 100
    serving(server, campaign_id)


def test_a_first_flight_over_the_limit_has_the_excess_refused(server: ServerProcess) -> None:
    """150 whole requests sent before the server's SETTINGS were read (RFC 9113, 6.5.3: a
    client may): as many as the limit answered, the rest refused, REFUSED_STREAM (safe to
    retry), the connection going on."""
    with H2Client(server.port) as client:
        campaign_id = create_campaign(client)
    with H2Client(server.port) as client:
        sent = []
        for _ in range(150):
            stream_id = client.conn.get_next_available_stream_id()
            client.conn.send_headers(stream_id, grpc_headers("GetCampaign", (b"te", b"trailers")))
            client.conn.send_data(stream_id, get_campaign(campaign_id), end_stream=True)
            sent.append(stream_id)
        client.flush()  # in one write
        got, goaways = outcomes(client, sent)
    assert goaways == []
    answered = [s for s in sent if got[s] == b"0"]
    refused = [s for s in sent if s not in answered]
    # A stream answered before the last ones were read frees its place: 100 at least.
    assert len(answered) >= 100 and refused
    assert all(got[s] == ErrorCodes.REFUSED_STREAM for s in refused)
    serving(server, campaign_id)


def test_a_stream_over_the_limit_reset_by_its_peer_in_the_same_read_is_dropped_quietly(
    server: ServerProcess,
) -> None:
    """The stream over the limit, and its peer's RST_STREAM in the same write: h2 has
    closed it before it is seen, and refusing it must not end the connection."""
    with H2Client(server.port) as client:
        campaign_id = create_campaign(client)
        opened = [client.start("GetCampaign", end=False) for _ in range(100)]
        extra = opened[-1] + 2
        client.sock.sendall(
            headers_frame(client, extra, "GetCampaign").serialize() + reset_frame(extra)
        )
        for stream_id in opened:
            client.conn.send_data(stream_id, get_campaign(campaign_id), end_stream=True)
        client.flush()
        got, goaways = outcomes(client, opened)
    assert goaways == []
    assert [got[s] for s in opened] == [b"0"] * 100
    serving(server, campaign_id)


def ping(i: int, _: int) -> bytes:
    return PingFrame(0, opaque_data=i.to_bytes(8, "big")).serialize()


def settings(i: int, _: int) -> bytes:
    frame = SettingsFrame(0)
    frame.settings = {SettingsFrame.INITIAL_WINDOW_SIZE: 65_536 + i % 7}
    return frame.serialize()


def empty_data(_: int, stream_id: int) -> bytes:
    return DataFrame(stream_id).serialize()


def byte_of_data(_: int, stream_id: int) -> bytes:
    """A request body sent a byte a frame (50,000 of them stay within the body's limit and
    the stream's window)."""
    return DataFrame(stream_id, data=b"x").serialize()


def window_update(_: int, stream_id: int) -> bytes:
    return WindowUpdateFrame(stream_id, window_increment=1).serialize()


def priority(_: int, stream_id: int) -> bytes:
    return PriorityFrame(stream_id, depends_on=0, stream_weight=16).serialize()


FLOODS: dict[str, Callable[[int, int], bytes]] = {
    "PING": ping,
    "SETTINGS": settings,
    "empty DATA": empty_data,
    "DATA of one byte": byte_of_data,
    "WINDOW_UPDATE": window_update,
    "PRIORITY": priority,
}


@pytest.mark.parametrize("kind", list(FLOODS))
def test_a_flood_of_frames_that_ask_nothing_ends_its_connection_alone(
    server: ServerProcess, kind: str
) -> None:
    """One connection sends frames that give the app nothing to do, 50,000 of them, while
    another makes calls: the flood's connection gets a GOAWAY (ENHANCE_YOUR_CALM), the
    other connection's calls are answered."""
    with H2Client(server.port) as setup:
        campaign_id = create_campaign(setup)
    closed_before = server.metric("coupon_connections_closed_total", reason="abuse")
    flooder = H2Client(server.port)
    flooder.sock.settimeout(10)
    open_stream = flooder.start("GetCampaign", end=False)  # for the frames on a stream
    frame = FLOODS[kind]
    received = bytearray()

    def read_all() -> None:
        try:
            while data := flooder.sock.recv(65_536):
                received.extend(data)
        except OSError:
            pass

    reader = threading.Thread(target=read_all)
    reader.start()
    probe = H2Client(server.port)
    answered = 0
    try:
        with contextlib.suppress(OSError):  # closed by the server meanwhile
            for batch in range(50):
                flooder.sock.sendall(
                    b"".join(frame(batch * 1000 + i, open_stream) for i in range(1000))
                )
                if batch % 10 == 0:
                    answer = probe.call(
                        "GetCampaign",
                        coupon_pb.GetCampaignRequest(campaign_id=campaign_id),
                        coupon_pb.GetCampaignResponse,
                    )
                    answered += answer.campaign is not None
        with contextlib.suppress(OSError):
            flooder.sock.shutdown(socket.SHUT_WR)
        reader.join(15)
    finally:
        probe.close()
        flooder.close()
    frames = FrameBuffer(server=False)
    frames.max_frame_size = flooder.conn.max_inbound_frame_size
    frames.add_data(bytes(received))
    goaways = [f.error_code for f in frames if isinstance(f, GoAwayFrame)]
    assert goaways == [ErrorCodes.ENHANCE_YOUR_CALM]
    assert answered >= 1
    serving(server, campaign_id)
    # Counted for the operator: one connection closed for abuse.
    assert server.metric("coupon_connections_closed_total", reason="abuse") == closed_before + 1


def test_a_read_of_many_frames_that_carry_requests_is_served_whole(
    server: ServerProcess,
) -> None:
    """Far more than the server gives h2 in one turn, in one write: requests whose bodies
    come in pieces, each frame padded (frames that carry data, not idle ones): every
    request is answered."""
    with H2Client(server.port) as client:
        campaign_id = create_campaign(client)
        body = get_campaign(campaign_id)
        out = b""
        sent = []
        for _ in range(100):
            stream_id = client.conn.get_next_available_stream_id()
            client.conn.highest_outbound_stream_id = stream_id
            out += headers_frame(client, stream_id, "GetCampaign").serialize()
            pieces = [body[i : i + 8] for i in range(0, len(body), 8)]
            for i, piece in enumerate(pieces):
                frame = DataFrame(stream_id, piece, pad_length=250, flags=["PADDED"])
                if i == len(pieces) - 1:
                    frame.flags.add("END_STREAM")
                out += frame.serialize()
            sent.append(stream_id)
        assert len(out) > 2 * 64 * 1024
        client.sock.sendall(out)
        got, goaways = outcomes(client, sent)
    assert goaways == []
    assert [got[s] for s in sent] == [b"0"] * 100
    serving(server, campaign_id)
