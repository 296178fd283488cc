#!/usr/bin/env python3
"""Client sessions recorded through record_proxy.py (see record_all.sh).

    record_clients.py psycopg  PORT   # psycopg 3: prepared statement, pipelines, COPY, CopyFail
    record_clients.py asyncpg  PORT   # asyncpg: cursor with prefetch => Execute row limit, PortalSuspended
"""

import asyncio
import sys


def psycopg_session(port: int) -> None:
    import psycopg

    dsn = f"host=127.0.0.1 port={port} user=postgres dbname=postgres sslmode=disable application_name=psycopg-fixture"
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TEMP TABLE items (id int PRIMARY KEY, name text)")
        # The same statement executed four times with prepare=True: one Parse of a named
        # statement, then Bind/Execute of that name only.
        for i in range(1, 5):
            conn.execute("SELECT %s::int + 1 AS next", (i,), prepare=True).fetchall()
        # Pipeline mode: several statements before one Sync.
        with conn.pipeline():
            conn.execute("INSERT INTO items VALUES (%s, %s)", (1, "one"))
            conn.execute("INSERT INTO items VALUES (%s, %s)", (2, "two"))
            conn.execute("UPDATE items SET name = upper(name) WHERE id = %s", (1,))
            conn.execute("SELECT id, name FROM items ORDER BY id")
        # A pipeline whose second statement fails: the server skips the rest until Sync.
        try:
            with conn.pipeline():
                conn.execute("INSERT INTO items VALUES (%s, %s)", (3, "three"))
                conn.execute("INSERT INTO items VALUES (%s, %s)", (1, "duplicate"))
                conn.execute("DELETE FROM items WHERE id = %s", (2,))
        except psycopg.errors.UniqueViolation:
            pass
        with conn.cursor() as cur:
            with cur.copy("COPY items (id, name) FROM STDIN") as copy:
                for i in range(10, 13):
                    copy.write_row((i, f"copied {i}"))
            # CopyFail: an exception inside the copy block makes psycopg abort the COPY.
            try:
                with cur.copy("COPY items (id, name) FROM STDIN") as copy:
                    copy.write_row((20, "never"))
                    raise RuntimeError("client gave up")
            except (RuntimeError, psycopg.errors.QueryCanceled):
                pass
        conn.execute("DELETE FROM items WHERE id >= %s", (10,))


async def asyncpg_session(port: int) -> None:
    import asyncpg

    conn = await asyncpg.connect(host="127.0.0.1", port=port, user="postgres", database="postgres", ssl=False)
    async with conn.transaction():
        rows = []
        async for r in conn.cursor("SELECT g FROM generate_series(1, 7) AS g", prefetch=3):
            rows.append(r[0])
        assert rows == list(range(1, 8)), rows
    await conn.close()


def main() -> None:
    which, port = sys.argv[1], int(sys.argv[2])
    if which == "psycopg":
        psycopg_session(port)
    elif which == "asyncpg":
        asyncio.run(asyncpg_session(port))
    else:
        raise SystemExit(f"unknown session {which}")


if __name__ == "__main__":
    main()
