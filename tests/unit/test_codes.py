from __future__ import annotations

import random
import shutil
import unicodedata
from pathlib import Path

import pytest

from coupon.domain.codes import (
    ALPHABET,
    CODE_LENGTH,
    COMPILED,
    CodeCipher,
    InvalidCode,
    is_well_formed,
)
from tools import build_feistel

KEY = bytes(range(32))
LAST_SEQUENCE = 2**60 - 1
needs_compiled = pytest.mark.skipif(not COMPILED, reason="the C network is not built here")


# Every test of a cipher runs on both networks: the C one the service uses, and the Python
# one it falls back on where no C compiler was.
@pytest.fixture(
    scope="module",
    params=[pytest.param(True, id="C", marks=needs_compiled), pytest.param(False, id="Python")],
)
def cipher(request: pytest.FixtureRequest) -> CodeCipher:
    made = CodeCipher(KEY, compiled=request.param)
    assert made.compiled is request.param
    return made


def is_hangul_syllable(symbol: str) -> bool:
    return "\uac00" <= symbol <= "\ud7a3"


def test_alphabet_is_64_distinct_hangul_syllables_and_the_ten_digits() -> None:
    assert len(ALPHABET) == 64
    assert len(set(ALPHABET)) == 64
    assert set("0123456789") <= set(ALPHABET)
    assert all(is_hangul_syllable(s) or s in "0123456789" for s in ALPHABET)


def test_alphabet_has_no_syllable_that_reads_as_a_number() -> None:
    assert not set("영공일이삼사오육칠팔구십백천만") & set(ALPHABET)


def test_codes_are_at_most_ten_hangul_syllables_and_digits(cipher: CodeCipher) -> None:
    rng = random.Random(1)
    for sequence in [0, 1, LAST_SEQUENCE] + [rng.randrange(2**60) for _ in range(1000)]:
        code = cipher.encode(sequence)
        assert len(code) == CODE_LENGTH <= 10
        assert all(is_hangul_syllable(s) or s in "0123456789" for s in code)
        assert is_well_formed(code)


@pytest.mark.parametrize(
    "sequence", [0, 1, 2, 2**30 - 1, 2**30, 2**59, LAST_SEQUENCE - 1, LAST_SEQUENCE]
)
def test_decode_inverts_encode_at_the_edges_of_the_range(cipher: CodeCipher, sequence: int) -> None:
    assert cipher.decode(cipher.encode(sequence)) == sequence


def test_decode_inverts_encode_for_random_sequences(cipher: CodeCipher) -> None:
    rng = random.Random(2)
    for _ in range(10_000):
        sequence = rng.randrange(2**60)
        assert cipher.decode(cipher.encode(sequence)) == sequence


def test_every_well_formed_code_decodes_to_the_sequence_that_encodes_to_it(
    cipher: CodeCipher,
) -> None:
    # The permutation is onto, so decode accepts any well-formed text; it is the issued
    # range, not decode, that tells a real code from a made-up one.
    rng = random.Random(3)
    for _ in range(10_000):
        code = "".join(rng.choices(ALPHABET, k=CODE_LENGTH))
        assert cipher.encode(cipher.decode(code)) == code


def test_a_million_consecutive_sequences_give_a_million_distinct_codes(
    cipher: CodeCipher,
) -> None:
    count = 1_000_000
    assert len(set(map(cipher.encode, range(count)))) == count


def test_the_same_key_always_gives_the_same_codes() -> None:
    first, second = CodeCipher(KEY), CodeCipher(bytes(KEY))
    assert [first.encode(n) for n in range(100)] == [second.encode(n) for n in range(100)]


def test_codes_for_a_fixed_key_never_change(cipher: CodeCipher) -> None:
    # Issued codes must keep decoding after an upgrade: if this fails, the algorithm
    # changed and every code already handed out has become invalid.
    assert cipher.encode(0) == "0드0파르0추파초고"
    assert cipher.encode(1) == "커푸르바나누버수너고"
    assert cipher.encode(LAST_SEQUENCE) == "버8다그0너2초카바"


def test_different_keys_give_different_codes() -> None:
    other_key = bytearray(KEY)
    other_key[-1] ^= 1
    ciphers = [CodeCipher(KEY), CodeCipher(bytes(other_key)), CodeCipher(b"\xff" * 64)]
    for sequence in range(1000):
        codes = {c.encode(sequence) for c in ciphers}
        assert len(codes) == len(ciphers)


def test_consecutive_codes_agree_in_no_more_positions_than_chance(cipher: CodeCipher) -> None:
    pairs = 20_000
    equal_at = [0] * CODE_LENGTH
    previous = cipher.encode(0)
    for sequence in range(1, pairs + 1):
        code = cipher.encode(sequence)
        for position in range(CODE_LENGTH):
            equal_at[position] += previous[position] == code[position]
        previous = code
    # Independent uniform symbols agree with probability 1/64 per position: 312.5 of
    # 20,000 pairs, standard deviation about 17.5. The bounds are some 6 deviations wide,
    # so only structure (shared prefixes, suffixes, a fixed half) can break them.
    assert all(200 <= count <= 430 for count in equal_at), equal_at
    assert sum(equal_at) / pairs == pytest.approx(CODE_LENGTH / 64, abs=0.02)


def value_of(code: str) -> int:
    value = 0
    for symbol in code:
        value = value * 64 + ALPHABET.index(symbol)
    return value


def code_of(value: int) -> str:
    return "".join(ALPHABET[(value >> shift) & 63] for shift in range(54, -1, -6))


def test_the_attack_that_breaks_a_three_round_feistel_network_fails(cipher: CodeCipher) -> None:
    # Luby-Rackoff's reason for needing four rounds: with three, encoding (L1, R) and
    # (L2, R) to (S1, T1) and (S2, T2), then decoding (S2, T2 ^ L1 ^ L2), always yields
    # a low half equal to S1 ^ S2 ^ R. Any cipher with fewer than four rounds fails here
    # every time; a strong pseudorandom permutation matches by chance once in 2**30.
    rng = random.Random(5)
    half, mask = 30, 2**30 - 1
    for _ in range(100):
        right, left1, left2 = rng.getrandbits(30), rng.getrandbits(30), rng.getrandbits(30)
        out1 = value_of(cipher.encode(left1 << half | right))
        out2 = value_of(cipher.encode(left2 << half | right))
        forged = (out2 >> half) << half | ((out2 & mask) ^ left1 ^ left2)
        decoded = cipher.decode(code_of(forged))
        assert decoded & mask != (out1 >> half) ^ (out2 >> half) ^ right


def test_a_code_under_another_key_decodes_to_an_unrelated_sequence(cipher: CodeCipher) -> None:
    stranger = CodeCipher(b"another secret key!")
    assert cipher.decode(stranger.encode(42)) != 42


@pytest.mark.parametrize(
    "text",
    [
        "",
        "가",
        "가나다라마바자차카",  # 9 symbols
        "가나다라마바자차카타파",  # 11 symbols
        "ABCDEFGHIJ",
        "가나다라마바자차카A",
        "가나다라마바자차카 ",
        "가나다라마바자차카삼",  # digit reading, deliberately left out of the alphabet
        "가나다라마바자차카ㄱ",  # a jamo, not a syllable
        "가나다라마바자차카٣",  # a digit, but not an ASCII one
        unicodedata.normalize("NFD", "가나다라마바자차카타"),
    ],
)
def test_decode_rejects_text_that_is_not_a_code(cipher: CodeCipher, text: str) -> None:
    assert not is_well_formed(text)
    with pytest.raises(InvalidCode):
        cipher.decode(text)


def test_invalid_code_is_a_value_error(cipher: CodeCipher) -> None:
    with pytest.raises(ValueError, match="exactly 10 characters"):
        cipher.decode("")


@pytest.mark.parametrize("sequence", [-1, 2**60, 2**64, -(2**60)])
def test_encode_rejects_a_sequence_outside_60_bits(cipher: CodeCipher, sequence: int) -> None:
    with pytest.raises(ValueError, match=r"\[0, 2\*\*60\)"):
        cipher.encode(sequence)


@pytest.mark.parametrize("length", [0, 1, 15, 65, 128])
def test_cipher_rejects_a_key_of_the_wrong_length(length: int) -> None:
    with pytest.raises(ValueError, match="16 to 64 bytes"):
        CodeCipher(b"k" * length)


@pytest.mark.parametrize("length", [16, 32, 64])
def test_cipher_accepts_a_key_of_16_to_64_bytes(length: int) -> None:
    cipher = CodeCipher(b"k" * length)
    assert cipher.decode(cipher.encode(7)) == 7


def test_setup_builds_the_c_network_wherever_there_is_a_c_compiler() -> None:
    # `just setup` runs tools/build_feistel.py; CI's machine has gcc, so a missing build
    # there is a broken setup, not a fallback.
    if shutil.which("cc") or shutil.which("gcc"):
        assert COMPILED
        assert CodeCipher(KEY).compiled


@needs_compiled
@pytest.mark.parametrize(
    "key", [bytes(range(16)), KEY, b"\xff" * 64, b"\x00" * 17], ids=["16", "32", "64", "17"]
)
def test_the_c_and_python_networks_give_the_same_codes(key: bytes) -> None:
    in_c, in_python = CodeCipher(key, compiled=True), CodeCipher(key, compiled=False)
    rng = random.Random(key)
    sequences = [*range(20_000), LAST_SEQUENCE, *(rng.randrange(2**60) for _ in range(20_000))]
    for sequence in sequences:
        code = in_c.encode(sequence)
        assert code == in_python.encode(sequence)
        assert in_c.decode(code) == sequence == in_python.decode(code)


@needs_compiled
@pytest.mark.parametrize(
    "alphabet", ["", ALPHABET[:63], ALPHABET + "x", ALPHABET[:63] + "\U0001f600"]
)
def test_the_c_network_takes_only_an_alphabet_of_64_symbols(alphabet: str) -> None:
    from coupon.domain import _feistel

    with pytest.raises(ValueError, match="64 characters"):
        _feistel.Feistel(KEY, b"person", alphabet)


@needs_compiled
def test_the_c_network_encodes_only_with_an_alphabet() -> None:
    from coupon.domain import _feistel

    with pytest.raises(TypeError, match="alphabet"):
        _feistel.Feistel(KEY, b"person").encode(1)


def test_the_build_compiles_once_and_leaves_nothing_behind_when_the_compiler_fails(
    tmp_path: Path,
) -> None:
    if not (shutil.which("cc") or shutil.which("gcc")):
        pytest.skip("no C compiler here")
    source = Path(build_feistel.__file__).resolve().parent.parent / "src" / build_feistel.SOURCE
    copy = tmp_path / build_feistel.SOURCE
    copy.parent.mkdir(parents=True)
    copy.write_bytes(source.read_bytes())
    assert build_feistel.build(tmp_path) == f"built {build_feistel.extension_path(tmp_path).name}"
    assert build_feistel.build(tmp_path) is None  # up to date: nothing to do
    copy.write_text("this is not C\n")
    built = build_feistel.extension_path(tmp_path)
    built.unlink()
    said = build_feistel.build(tmp_path)
    assert said is not None and said.startswith("the C build failed")
    assert list(copy.parent.iterdir()) == [copy]
