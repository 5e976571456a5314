"""Code generators of different server processes share one PostgreSQL sequence of blocks:
their codes never clash, and a restart only leaves a gap."""

from __future__ import annotations

import asyncio

import asyncpg

from coupon.adapters.postgres.ledger import PostgresCodeGenerator
from coupon.domain.codes import is_well_formed


async def test_codes_from_concurrent_generators_never_clash(pg_pool: asyncpg.Pool) -> None:
    generators = [PostgresCodeGenerator(pg_pool) for _ in range(4)]

    async def draw(gen: PostgresCodeGenerator) -> list[str]:
        # More than one block (10,000) each: every generator reserves a second block.
        return [await gen.next_code() for _ in range(PostgresCodeGenerator.BLOCK + 500)]

    batches = await asyncio.gather(*(draw(g) for g in generators))
    codes = [c for batch in batches for c in batch]
    assert len(set(codes)) == len(codes) == 4 * (PostgresCodeGenerator.BLOCK + 500)
    assert all(is_well_formed(c) for c in codes)


async def test_a_restarted_generator_does_not_reuse_codes(pg_pool: asyncpg.Pool) -> None:
    before = {await PostgresCodeGenerator(pg_pool).next_code() for _ in range(1)}
    first = PostgresCodeGenerator(pg_pool)
    seen = {await first.next_code() for _ in range(100)}
    second = PostgresCodeGenerator(pg_pool)  # as after a restart
    again = {await second.next_code() for _ in range(100)}
    assert not (seen | before) & again
