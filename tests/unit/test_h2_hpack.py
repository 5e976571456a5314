"""HTTP/2 header compression as the server does it (http/h2.py): the encoder that never
indexes and reuses its blocks, the decoder that reuses blocks while the table stands still.
Each is checked against hpack's own decoder and encoder, as a peer would be."""

from __future__ import annotations

import pytest
from hpack import Decoder, Encoder, NeverIndexedHeaderTuple

from coupon.entrypoints.http.h2 import _Decoder, _Encoder

LISTS = [
    [(b":status", b"200"), (b"content-type", b"application/json")],
    [(b":status", b"503"), (b"content-type", b"application/proto"), (b"retry-after", b"1")],
    [(b":status", b"200"), (b"content-length", b"176"), (b"retry-after-ms", b"200")],
    [(b"grpc-status", b"14"), (b"grpc-message", b"x" * 300)],  # lengths past one byte
    [(b"access-control-allow-origin", b"https://shop.example"), (b"vary", b"Origin")],
]


@pytest.mark.parametrize("headers", LISTS)
def test_a_peer_decodes_every_block_as_it_was_written(headers: list[tuple[bytes, bytes]]) -> None:
    encoder, peer = _Encoder(), Decoder()
    for _ in range(3):  # the first block computed, the others reused: all the same to a peer
        assert peer.decode(encoder.encode(headers), raw=True) == headers
    assert len(peer.header_table.dynamic_entries) == 0  # nothing was ever indexed


def test_fields_the_static_table_holds_whole_are_one_byte() -> None:
    assert _Encoder().encode([(b":status", b"200")]) == b"\x88"


def test_a_sensitive_field_is_sent_never_indexed() -> None:
    block = _Encoder().encode([NeverIndexedHeaderTuple(b"authorization", b"Bearer s3cret")])
    assert block[0] & 0xF0 == 0x10
    assert Decoder().decode(block, raw=True) == [(b"authorization", b"Bearer s3cret")]


def test_a_peers_smaller_table_is_signalled_once_at_the_start_of_the_next_block() -> None:
    encoder, peer = _Encoder(), Decoder()
    headers = LISTS[0]
    encoder.header_table_size = 0  # the peer's SETTINGS_HEADER_TABLE_SIZE, as h2 sets it
    first = encoder.encode(headers)
    assert first[0] == 0x20  # a dynamic table size update to 0
    assert peer.decode(first, raw=True) == headers
    assert peer.header_table.maxsize == 0
    assert encoder.encode(headers) == first[1:]


def test_a_block_that_refers_to_the_table_is_decoded_anew_once_the_table_changed() -> None:
    client, server = Encoder(), _Decoder()
    # The first block adds a field to the table; the second only refers to it (index 62).
    assert server.decode(client.encode([(b"x-shop", b"one")]), raw=True) == [(b"x-shop", b"one")]
    again = client.encode([(b"x-shop", b"one")])
    assert again == b"\xbe"
    assert server.decode(again, raw=True) == [(b"x-shop", b"one")]
    assert server.decode(again, raw=True) == [(b"x-shop", b"one")]  # reused
    # A new field takes index 62: the same byte now means it.
    assert server.decode(client.encode([(b"x-shop", b"two")]), raw=True) == [(b"x-shop", b"two")]
    assert server.decode(b"\xbe", raw=True) == [(b"x-shop", b"two")]
    # A size update that empties the table makes the old block an error, not a reuse.
    server.header_table_size = 0
    with pytest.raises(Exception, match="Invalid table index"):
        server.decode(b"\xbe", raw=True)


def test_a_reused_block_is_a_new_list_each_time() -> None:
    client, server = Encoder(), _Decoder()
    headers = [(b":method", b"POST"), (b":path", b"/coupon.v1.CouponService/X")]
    server.decode(client.encode(headers), raw=True)  # :path enters the table
    block = client.encode(headers)
    first = server.decode(block, raw=True)
    first.append((b"spoiled", b"yes"))
    assert server.decode(block, raw=True) == [
        (b":method", b"POST"),
        (b":path", b"/coupon.v1.CouponService/X"),
    ]


def test_a_repeated_table_size_still_has_the_changes_before_it_signalled() -> None:
    """A peer's SETTINGS 0, then 4096, then 4096 again: h2 sets the encoder's size each
    time, and hpack's flag of a change is cleared by the repeat with the changes unsent.
    The next block must still begin with the smallest size (0), then the current."""
    encoder, peer = _Encoder(), Decoder()
    for size in (0, 4096, 4096):
        encoder.header_table_size = size
    block = encoder.encode(LISTS[0])
    assert block.startswith(b"\x20\x3f\xe1\x1f"), block.hex()  # 0, then 4096
    assert peer.decode(block, raw=True) == LISTS[0]
    assert not encoder.encode(LISTS[0]).startswith(b"\x20")  # signalled once
    encoder.header_table_size = 100
    encoder.header_table_size = 100
    assert encoder.encode(LISTS[0]).startswith(b"\x3f\x45"), "100, signalled once"
