"""Coupon codes: a keyed, format-preserving permutation of a global sequence number.

A code is 10 symbols from a 64-symbol alphabet (54 Hangul syllables and the digits), so
it carries exactly 60 bits. The sequence number n in [0, 2**60) is split into two 30-bit
halves and run through a balanced Feistel network, (L, R) -> (R, L xor F_i(R)), whose
round functions F_i are BLAKE2b keyed with a secret key and separated per round by the
salt. Each round is invertible whatever F_i is (xor the same F_i(R) back), so the whole
network is a bijection on 60-bit values: distinct sequence numbers give distinct codes by
construction, with no collision check, no retry and nothing stored.

Why the codes are not guessable: with independent pseudorandom round functions, four
Feistel rounds already make a strong pseudorandom permutation (Luby-Rackoff), i.e. one
that cannot be told apart from a random permutation even by someone who can both encode
and decode chosen values. That bound, about q**2 / 2**30 for q observed codes, is weak
for 30-bit halves, so we use 8 rounds (as NIST FF3-1 does); more rounds push the
distinguishing cost towards 2**30 queries (Patarin). Without the key, codes in hand say
nothing useful about the codes of other sequence numbers.

Every well-formed string decodes to some sequence number, because the permutation is
onto. Whether a code was actually issued is decided by comparing the decoded number with
what has been issued (or by looking the code up), not by `decode` alone; a blind guess
hits one of N issued codes with probability N / 2**60.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

try:  # the same network in C, built from _feistel.c by tools/build_feistel.py
    from coupon.domain import _feistel
except ImportError:  # not built (no C compiler where it was installed): the Python rounds
    _feistel = None  # type: ignore[assignment]

COMPILED = _feistel is not None

CODE_LENGTH = 10

# No syllable that reads as a digit (영 공 일 이 삼 사 오 육 칠 팔 구, 십 백 천 만): read
# aloud, "삼" and "3" would be the same word for two different symbols.
ALPHABET = (
    "가나다라마바자차카타파하"
    "거너더러머버저처커터퍼허"
    "고노도로모보소조초코토포호"
    "누두루무부수주추쿠투푸후"
    "그느드르므"
    "0123456789"
)

_BITS_PER_SYMBOL = 6
_HALF_BITS = CODE_LENGTH * _BITS_PER_SYMBOL // 2
_HALF_MASK = (1 << _HALF_BITS) - 1
_SEQUENCE_LIMIT = 1 << (2 * _HALF_BITS)
_ROUNDS = 8
KEY_MIN_BYTES = 16
KEY_MAX_BYTES = 64  # BLAKE2b's own limit for a key.
# Keeps this use of the key apart from any other BLAKE2b use of the same key; changing
# it changes every code, so it is versioned.
_PERSONALIZATION = b"coupon.code.v1"

assert len(ALPHABET) == 1 << _BITS_PER_SYMBOL == len(set(ALPHABET))

_SYMBOL_VALUE = {symbol: value for value, symbol in enumerate(ALPHABET)}
# Two symbols per lookup halves the work of turning a 60-bit value into text.
_PAIRS = tuple(a + b for a in ALPHABET for b in ALPHABET)
_PAIR_MASK = (1 << (2 * _BITS_PER_SYMBOL)) - 1


class InvalidCode(ValueError):
    """The text is not a coupon code of this format (wrong length or symbol)."""


class CodeCipher:
    """Turns sequence numbers into codes and back, under one secret key.

    The same key must be used for the lifetime of the codes: a different key gives a
    different permutation, so codes issued under the old key would decode to garbage.
    """

    __slots__ = ("_backward", "_forward", "_rounds", "_rounds_reversed", "encode")

    # A sequence number in [0, 2**60) as its code (ValueError outside): the network's own
    # function, with no call around it. python -m timeit on CPython 3.11 (2 vCPUs), in a
    # slow spell of the VM: 10.4 us per call with the rounds in Python, almost all of it
    # the eight BLAKE2b calls' overhead around their compressions; 1.2 us for the network
    # in C. The C module also writes the text: its 64 symbols stay in the cache, where the
    # pairs table (4,096 strings) did not in a busy server.
    encode: Callable[[int], str]

    def __init__(self, key: bytes, *, compiled: bool | None = None) -> None:
        """`compiled`: run the network in C (True), in Python (False), or in C when it is
        built (None). Both give the same codes, bit for bit."""
        if not isinstance(key, (bytes, bytearray)):
            raise TypeError(f"key must be bytes, not {type(key).__name__}")
        if not KEY_MIN_BYTES <= len(key) <= KEY_MAX_BYTES:
            raise ValueError(
                f"key must be {KEY_MIN_BYTES} to {KEY_MAX_BYTES} bytes long (got {len(key)}); "
                f"use a random secret, e.g. secrets.token_bytes(32)"
            )
        # Absorbing the key once here and copying the state per call means each round
        # costs one compression instead of two.
        self._rounds = tuple(
            hashlib.blake2b(key=key, digest_size=4, salt=bytes([i]), person=_PERSONALIZATION)
            for i in range(_ROUNDS)
        )
        self._rounds_reversed = self._rounds[::-1]
        if compiled is None:
            compiled = COMPILED
        if compiled:
            if _feistel is None:
                raise RuntimeError("the compiled network is not built (tools/build_feistel.py)")
            network = _feistel.Feistel(bytes(key), _PERSONALIZATION, ALPHABET)
            self._forward: Callable[[int], int] = network.forward
            self._backward: Callable[[int], int] = network.backward
            self.encode = network.encode
        else:
            self._forward = self._python_forward
            self._backward = self._python_backward
            self.encode = self._python_encode

    @property
    def compiled(self) -> bool:
        return self._forward != self._python_forward

    def _python_encode(self, sequence: int) -> str:
        if not 0 <= sequence < _SEQUENCE_LIMIT:
            raise ValueError(f"sequence must be in [0, 2**60) (got {sequence})")
        value = self._forward(sequence)
        pairs = _PAIRS
        return (
            pairs[value >> 48]
            + pairs[(value >> 36) & _PAIR_MASK]
            + pairs[(value >> 24) & _PAIR_MASK]
            + pairs[(value >> 12) & _PAIR_MASK]
            + pairs[value & _PAIR_MASK]
        )

    def decode(self, code: str) -> int:
        return self._backward(_parse(code))

    def _python_forward(self, value: int) -> int:
        left = value >> _HALF_BITS
        right = value & _HALF_MASK
        for keyed in self._rounds:
            f = keyed.copy()
            f.update(right.to_bytes(4, "big"))
            left, right = right, left ^ (int.from_bytes(f.digest(), "big") & _HALF_MASK)
        return (left << _HALF_BITS) | right

    def _python_backward(self, value: int) -> int:
        left = value >> _HALF_BITS
        right = value & _HALF_MASK
        for keyed in self._rounds_reversed:
            f = keyed.copy()
            f.update(left.to_bytes(4, "big"))
            left, right = right ^ (int.from_bytes(f.digest(), "big") & _HALF_MASK), left
        return (left << _HALF_BITS) | right


def is_well_formed(code: str) -> bool:
    """Right length and alphabet; says nothing about whether the code was issued."""
    return (
        isinstance(code, str)
        and len(code) == CODE_LENGTH
        and all(symbol in _SYMBOL_VALUE for symbol in code)
    )


def _parse(code: str) -> int:
    if not isinstance(code, str):
        raise InvalidCode(f"a coupon code must be text, not {type(code).__name__}")
    if len(code) != CODE_LENGTH:
        raise InvalidCode(f"a coupon code has exactly {CODE_LENGTH} characters (got {len(code)})")
    value = 0
    for symbol in code:
        symbol_value = _SYMBOL_VALUE.get(symbol)
        if symbol_value is None:
            raise InvalidCode(
                f"a coupon code contains only Hangul syllables from its alphabet and "
                f"digits; {symbol!r} is not one of them"
            )
        value = (value << _BITS_PER_SYMBOL) | symbol_value
    return value
