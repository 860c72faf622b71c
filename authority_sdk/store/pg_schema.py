"""The PostgreSQL schema and its versioned migrations (``authority db migrate``).

Tables live in the connection's ``current_schema()`` (set ``search_path`` in the DSN to
keep several gateways, or tests, apart in one database). ``authority_meta`` holds the
schema version. Each migration runs once, in order, inside one transaction that holds a
transaction-scoped advisory lock on the schema: replicas started together serialise on
it, and the one that comes second finds nothing left to do.

A gateway never migrates on its own: ``serve`` refuses a schema older (or newer) than
the one it was built for, so two versions of the gateway never write one database.
"""

from __future__ import annotations

from typing import Any

__all__ = ["MIGRATIONS", "SCHEMA_VERSION", "migrate", "schema_version"]

# Records are JSON *text*, not jsonb: jsonb refuses a lone surrogate escape ("\ud800"),
# which a hostile client or model can put in any argument. The fields a primitive
# compares on are columns of their own. Times are epoch seconds of the database's clock.
MIGRATIONS: list[tuple[int, str]] = [
    (1, """
CREATE TABLE authority_idem (
    key text PRIMARY KEY,
    claim_id text,
    record text NOT NULL,
    expires_at double precision NOT NULL
);
CREATE TABLE authority_counters (
    name text PRIMARY KEY,
    used double precision NOT NULL,
    expires_at double precision NOT NULL
);
CREATE TABLE authority_kill_switch (
    scope text PRIMARY KEY,
    entry text NOT NULL
);
CREATE TABLE authority_approvals (
    id text PRIMARY KEY,
    status text NOT NULL,
    created_at double precision NOT NULL,
    record text NOT NULL
);
CREATE INDEX authority_approvals_by_status
    ON authority_approvals (status, created_at DESC, id);
CREATE INDEX authority_approvals_by_time ON authority_approvals (created_at DESC, id);
CREATE TABLE authority_journal (
    action_key text PRIMARY KEY,
    status text NOT NULL,
    started_at double precision NOT NULL,
    audited boolean,
    record text NOT NULL,
    expires_at double precision
);
CREATE INDEX authority_journal_open ON authority_journal (status, started_at DESC)
    WHERE status IN ('started', 'in_doubt');
CREATE INDEX authority_journal_unaudited ON authority_journal (started_at DESC)
    WHERE audited = false;
CREATE INDEX authority_journal_by_time ON authority_journal (started_at DESC);
CREATE TABLE authority_dedupe (
    key text PRIMARY KEY,
    action_key text,
    owner text NOT NULL,
    claimed_at double precision NOT NULL,
    expires_at double precision NOT NULL
);
CREATE TABLE authority_outbox (
    kind text NOT NULL,
    item_id text NOT NULL,
    seq bigserial,
    payload text NOT NULL,
    PRIMARY KEY (kind, item_id)
);
CREATE INDEX authority_outbox_order ON authority_outbox (kind, seq);
CREATE TABLE authority_leases (
    name text PRIMARY KEY,
    holder text NOT NULL,
    until double precision NOT NULL
);
CREATE TABLE authority_audit_head (
    id smallint PRIMARY KEY DEFAULT 1 CHECK (id = 1),
    seq bigint NOT NULL,
    hash text NOT NULL
);
"""),
    # The audit chain of every replica in one table (audit.backend: postgres): appends are
    # serialised by an advisory lock in the appending transaction.
    (2, """
CREATE TABLE authority_audit (
    seq bigint PRIMARY KEY,
    entry text NOT NULL
);
"""),
    # A reservation and a settlement each in one statement (one round trip, one implicit
    # transaction) instead of a transaction of up to four (pg_plans.budget_reserve): the
    # same steps, on the server. Unqualified names resolve through the caller's
    # search_path, like every statement the gateway sends. Generic plans: a statement over
    # an array parameter otherwise gets a custom plan, planned anew on every call (half
    # the function's time: a settlement took 260 µs of server time, 110 µs so).
    (3, """
-- Lock the counter rows named (deduplicated), one at a time in name order, creating those
-- missing (a new period): an existing row is locked and not written (the DO UPDATE's
-- WHERE is false, the lock stays), a missing one is inserted and ours until commit.
-- Every reservation and settlement takes its rows in this one order, new rows included,
-- so none waits for another that waits for it. (Locking the existing rows first and
-- inserting the missing ones after, as schema version 2's gateway did, deadlocks when
-- two reservations over overlapping counters start a period together.)
-- used is 0 for a counter whose period ended (expired: a new period starts at 0).
CREATE FUNCTION authority_counters_lock(wanted text[], OUT names text[],
                                        OUT used double precision[])
LANGUAGE plpgsql SET plan_cache_mode = force_generic_plan AS $$
BEGIN
    INSERT INTO authority_counters AS c (name, used, expires_at)
        SELECT DISTINCT n, 0::float8, 0::float8 FROM unnest(wanted) AS n ORDER BY n
        ON CONFLICT (name) DO UPDATE SET used = c.used WHERE false;
    -- A statement of its own: its snapshot is taken once every lock is held.
    SELECT array_agg(c.name ORDER BY c.name),
           array_agg(CASE WHEN c.expires_at > extract(epoch from clock_timestamp())::float8
                          THEN c.used ELSE 0 END ORDER BY c.name)
      INTO names, used
      FROM authority_counters c WHERE c.name = ANY(wanted);
    IF coalesce(cardinality(names), 0)
       <> (SELECT count(DISTINCT n) FROM unnest(wanted) AS n) THEN
        RAISE EXCEPTION 'a counter row vanished under its lock';
    END IF;
END
$$;

-- Reserve up to max_usd (at least min_usd) on every counter (name, limit): NULL when
-- the room left on some counter is below min_usd, else the amount granted. A counter
-- named twice keeps the lower of its two new values.
CREATE FUNCTION authority_budget_reserve(names text[], limits double precision[],
                                         min_usd double precision,
                                         max_usd double precision,
                                         ttl_s double precision)
RETURNS double precision
LANGUAGE plpgsql SET plan_cache_mode = force_generic_plan AS $$
DECLARE
    locked record;
    room double precision;
    granted double precision;
BEGIN
    SELECT * INTO locked FROM authority_counters_lock(names);
    SELECT min(q.lim - u.used) INTO room
      FROM unnest(names, limits) AS q(name, lim)
      JOIN unnest(locked.names, locked.used) AS u(name, used) USING (name);
    IF room < min_usd THEN
        RETURN NULL;
    END IF;
    granted := least(max_usd, room);
    -- Clamped, so float rounding of used + (limit - used) cannot pass the limit.
    UPDATE authority_counters AS c
       SET used = v.used, expires_at = extract(epoch from clock_timestamp())::float8 + ttl_s
      FROM (SELECT q.name, min(least(u.used + granted, greatest(q.lim, u.used))) AS used
              FROM unnest(names, limits) AS q(name, lim)
              JOIN unnest(locked.names, locked.used) AS u(name, used) USING (name)
             GROUP BY q.name) AS v
     WHERE c.name = v.name;
    RETURN granted;
END
$$;

-- Add delta (actual - reserved) to every counter named; a counter whose period ended
-- meanwhile starts again at 0 and never goes negative.
CREATE FUNCTION authority_budget_settle(names text[], delta double precision,
                                        ttl_s double precision)
RETURNS void
LANGUAGE plpgsql SET plan_cache_mode = force_generic_plan AS $$
DECLARE
    locked record;
BEGIN
    SELECT * INTO locked FROM authority_counters_lock(names);
    UPDATE authority_counters AS c
       SET used = greatest(u.used + delta, 0),
           expires_at = extract(epoch from clock_timestamp())::float8 + ttl_s
      FROM unnest(locked.names, locked.used) AS u(name, used)
     WHERE c.name = u.name;
END
$$;
"""),
    # Group commit on the async driver (postgres.py, _Batcher): the idempotency writes and
    # the budget reservations and settlements of many concurrent requests in ONE statement,
    # one implicit transaction, one commit (and at most one WAL flush) for all of them,
    # each item with its own result. The same steps as the one-item statements, in this
    # order: every counter of the batch locked first, in name order (as every reservation
    # takes them), then the items, the idempotency ones in key order (the caller sorts):
    # two batches never wait for each other in a circle. The commit waits for its WAL
    # flush unless every item may skip it (relax, pg_plans.RELAXED).
    (4, """
-- kinds[i]: claim | replace | delete | put (an idempotency record under keys[i]: the
-- claim_id column claim_ids[i], the record records[i], living ttls[i] seconds; replace and
-- delete only if the live record's claim_id is expect[i]) | reserve | settle (counters
-- c_name[c_lo[i]:c_hi[i]], with limits c_limit[…]; reserve: at least lo[i], at most
-- hi[i]; settle: add lo[i], never below 0; the counters live ttls[i] seconds).
-- Result per item: claim NULL (claimed) or the record in the way; replace, delete, put
-- '1' or '0'; reserve the amount granted or NULL; settle NULL.
CREATE FUNCTION authority_state_batch(relax boolean, kinds text[], keys text[],
                                      expect text[], claim_ids text[], records text[],
                                      ttls double precision[], lo double precision[],
                                      hi double precision[], c_lo integer[],
                                      c_hi integer[], c_name text[],
                                      c_limit double precision[])
RETURNS text[]
LANGUAGE plpgsql SET plan_cache_mode = force_generic_plan AS $$
DECLARE
    out text[] := array_fill(NULL::text, ARRAY[cardinality(kinds)]);
    i integer;
    kind text;
    found_record text;
    room double precision;
    granted double precision;
BEGIN
    IF relax THEN
        PERFORM set_config('synchronous_commit', 'off', true);
    END IF;
    IF coalesce(cardinality(c_name), 0) > 0 THEN
        PERFORM authority_counters_lock(c_name);
    END IF;
    FOR i IN 1 .. coalesce(cardinality(kinds), 0) LOOP
        kind := kinds[i];
        IF kind = 'claim' THEN
            -- An existing live row is locked and left as it is (the WHERE is false): the
            -- next statement, with a snapshot of its own, reads the record in the way.
            INSERT INTO authority_idem AS t (key, claim_id, record, expires_at)
            VALUES (keys[i], claim_ids[i], records[i],
                    extract(epoch from clock_timestamp())::float8 + ttls[i])
            ON CONFLICT (key) DO UPDATE SET claim_id = EXCLUDED.claim_id,
                record = EXCLUDED.record, expires_at = EXCLUDED.expires_at
            WHERE t.expires_at <= extract(epoch from clock_timestamp())::float8;
            IF NOT FOUND THEN
                SELECT t.record INTO found_record FROM authority_idem t WHERE t.key = keys[i];
                IF NOT FOUND THEN
                    RAISE EXCEPTION 'an idempotency row vanished under its lock';
                END IF;
                out[i] := found_record;
            END IF;
        ELSIF kind = 'replace' THEN
            UPDATE authority_idem SET claim_id = claim_ids[i], record = records[i],
                   expires_at = extract(epoch from clock_timestamp())::float8 + ttls[i]
             WHERE key = keys[i] AND claim_id = expect[i]
               AND expires_at > extract(epoch from clock_timestamp())::float8;
            out[i] := CASE WHEN FOUND THEN '1' ELSE '0' END;
        ELSIF kind = 'delete' THEN
            DELETE FROM authority_idem
             WHERE key = keys[i] AND claim_id = expect[i]
               AND expires_at > extract(epoch from clock_timestamp())::float8;
            out[i] := CASE WHEN FOUND THEN '1' ELSE '0' END;
        ELSIF kind = 'put' THEN
            INSERT INTO authority_idem (key, claim_id, record, expires_at)
            VALUES (keys[i], claim_ids[i], records[i],
                    extract(epoch from clock_timestamp())::float8 + ttls[i])
            ON CONFLICT (key) DO UPDATE SET claim_id = EXCLUDED.claim_id,
                record = EXCLUDED.record, expires_at = EXCLUDED.expires_at;
            out[i] := '1';
        ELSIF kind = 'reserve' THEN
            -- As authority_budget_reserve, on rows this batch already holds (and may have
            -- written: an earlier item's grant counts).
            SELECT min(q.lim - CASE WHEN c.expires_at
                                         > extract(epoch from clock_timestamp())::float8
                                    THEN c.used ELSE 0 END) INTO room
              FROM unnest(c_name[c_lo[i]:c_hi[i]], c_limit[c_lo[i]:c_hi[i]]) AS q(name, lim)
              JOIN authority_counters c ON c.name = q.name;
            IF room IS NULL OR room < lo[i] THEN
                CONTINUE;
            END IF;
            granted := least(hi[i], room);
            UPDATE authority_counters AS c
               SET used = v.used,
                   expires_at = extract(epoch from clock_timestamp())::float8 + ttls[i]
              FROM (SELECT q.name,
                           min(least(u.used + granted, greatest(q.lim, u.used))) AS used
                      FROM unnest(c_name[c_lo[i]:c_hi[i]], c_limit[c_lo[i]:c_hi[i]])
                           AS q(name, lim)
                      JOIN (SELECT c2.name,
                                   CASE WHEN c2.expires_at
                                             > extract(epoch from clock_timestamp())::float8
                                        THEN c2.used ELSE 0 END AS used
                              FROM authority_counters c2
                             WHERE c2.name = ANY(c_name[c_lo[i]:c_hi[i]])) AS u
                           USING (name)
                     GROUP BY q.name) AS v
             WHERE c.name = v.name;
            out[i] := granted::text;
        ELSIF kind = 'settle' THEN
            UPDATE authority_counters AS c
               SET used = greatest(CASE WHEN c.expires_at
                                             > extract(epoch from clock_timestamp())::float8
                                        THEN c.used ELSE 0 END + lo[i], 0),
                   expires_at = extract(epoch from clock_timestamp())::float8 + ttls[i]
             WHERE c.name = ANY(c_name[c_lo[i]:c_hi[i]]);
        ELSE
            RAISE EXCEPTION 'unknown batch item kind %', kind;
        END IF;
    END LOOP;
    RETURN out;
END
$$;

-- The audit sink's common append in one round trip (audit/postgres.py): under the chain's
-- lock, iff the table's last entry is still the one the appender last wrote or saw
-- (expect_seq, expect_hash; NULL: an empty table), insert the entries and, when the state
-- store's head lives in this database, move it (only ever forward). false: another
-- replica appended meanwhile (or rows went): nothing written, the appender takes its full
-- way, which records what it finds.
CREATE FUNCTION authority_audit_append(relax boolean, expect_seq bigint, expect_hash text,
                                       seqs bigint[], entries text[], head_seq bigint,
                                       head_hash text)
RETURNS boolean
LANGUAGE plpgsql SET plan_cache_mode = force_generic_plan AS $$
DECLARE
    last_seq bigint;
    last_entry text;
BEGIN
    IF relax THEN
        PERFORM set_config('synchronous_commit', 'off', true);
    END IF;
    PERFORM pg_advisory_xact_lock(hashtext('authority-audit:' || current_schema()));
    -- A statement of its own: its snapshot is taken once the lock is held, so it sees an
    -- append that committed while this one waited.
    SELECT a.seq, a.entry INTO last_seq, last_entry
      FROM authority_audit a ORDER BY a.seq DESC LIMIT 1;
    IF last_seq IS DISTINCT FROM expect_seq
       OR (last_entry::json ->> 'hash') IS DISTINCT FROM expect_hash THEN
        RETURN false;
    END IF;
    INSERT INTO authority_audit (seq, entry) SELECT * FROM unnest(seqs, entries);
    IF head_seq IS NOT NULL THEN
        INSERT INTO authority_audit_head (id, seq, hash) VALUES (1, head_seq, head_hash)
        ON CONFLICT (id) DO UPDATE SET seq = EXCLUDED.seq, hash = EXCLUDED.hash
        WHERE authority_audit_head.seq < EXCLUDED.seq;
    END IF;
    RETURN true;
END
$$;
"""),
    (5, """
-- A keyed request's claim and its budget reservation in one statement: one round trip and
-- one commit where they took two. The counters are locked first, as every state batch
-- locks them, so no two statements wait on each other in a circle; then the claim, as
-- kind 'claim' of the state batch makes it; only a request whose claim was taken
-- reserves, so a replayed or refused request never holds budget, not even for a moment
-- (it is one transaction). Returns {the record in the way, NULL} when the key is held,
-- else {NULL, the grant} (the grant NULL: refused, the claim taken all the same).
CREATE FUNCTION authority_claim_reserve(p_key text, p_claim_id text, p_record text,
                                        p_ttl double precision, names text[],
                                        limits double precision[],
                                        min_usd double precision, max_usd double precision,
                                        budget_ttl double precision)
RETURNS text[]
LANGUAGE plpgsql SET plan_cache_mode = force_generic_plan AS $$
DECLARE
    found_record text;
BEGIN
    PERFORM authority_counters_lock(names);
    INSERT INTO authority_idem AS t (key, claim_id, record, expires_at)
    VALUES (p_key, p_claim_id, p_record, extract(epoch from clock_timestamp())::float8 + p_ttl)
    ON CONFLICT (key) DO UPDATE SET claim_id = EXCLUDED.claim_id,
        record = EXCLUDED.record, expires_at = EXCLUDED.expires_at
    WHERE t.expires_at <= extract(epoch from clock_timestamp())::float8;
    IF NOT FOUND THEN
        SELECT t.record INTO found_record FROM authority_idem t WHERE t.key = p_key;
        IF NOT FOUND THEN
            RAISE EXCEPTION 'an idempotency row vanished under its lock';
        END IF;
        RETURN ARRAY[found_record, NULL];
    END IF;
    RETURN ARRAY[NULL, authority_budget_reserve(names, limits, min_usd, max_usd,
                                                budget_ttl)::text];
END
$$;
"""),
    # Fewer statements per call, the same steps and results (each statement a function runs
    # costs ~25 µs of server time on the benchmark machine, on the critical path of every
    # keyed request): the counters are locked once per statement, not once more per
    # reservation, and the check that none vanished rides on the read that needs them.
    # authority_claim_reserve went from nine statements to four (290 -> 176 µs of server
    # time in isolation), authority_state_batch with counters from four to two.
    (6, """
CREATE OR REPLACE FUNCTION authority_counters_lock(wanted text[], OUT names text[],
                                                   OUT used double precision[])
LANGUAGE plpgsql SET plan_cache_mode = force_generic_plan AS $$
DECLARE
    distinct_wanted bigint;
BEGIN
    INSERT INTO authority_counters AS c (name, used, expires_at)
        SELECT DISTINCT n, 0::float8, 0::float8 FROM unnest(wanted) AS n ORDER BY n
        ON CONFLICT (name) DO UPDATE SET used = c.used WHERE false;
    -- A statement of its own: its snapshot is taken once every lock is held.
    SELECT array_agg(c.name ORDER BY c.name),
           array_agg(CASE WHEN c.expires_at > extract(epoch from clock_timestamp())::float8
                          THEN c.used ELSE 0 END ORDER BY c.name),
           (SELECT count(DISTINCT n) FROM unnest(wanted) AS n)
      INTO names, used, distinct_wanted
      FROM authority_counters c WHERE c.name = ANY(wanted);
    IF coalesce(cardinality(names), 0) <> distinct_wanted THEN
        RAISE EXCEPTION 'a counter row vanished under its lock';
    END IF;
END
$$;

-- As version 5's, in four statements: lock the counters, claim, read the room left (the
-- rows are ours: a statement of its own sees them as the last commit left them), write
-- the reservation.
CREATE OR REPLACE FUNCTION authority_claim_reserve(p_key text, p_claim_id text,
                                                   p_record text, p_ttl double precision,
                                                   names text[], limits double precision[],
                                                   min_usd double precision,
                                                   max_usd double precision,
                                                   budget_ttl double precision)
RETURNS text[]
LANGUAGE plpgsql SET plan_cache_mode = force_generic_plan AS $$
DECLARE
    found_record text;
    room double precision;
    seen bigint;
    granted double precision;
BEGIN
    INSERT INTO authority_counters AS c (name, used, expires_at)
        SELECT DISTINCT n, 0::float8, 0::float8 FROM unnest(names) AS n ORDER BY n
        ON CONFLICT (name) DO UPDATE SET used = c.used WHERE false;
    INSERT INTO authority_idem AS t (key, claim_id, record, expires_at)
    VALUES (p_key, p_claim_id, p_record, extract(epoch from clock_timestamp())::float8 + p_ttl)
    ON CONFLICT (key) DO UPDATE SET claim_id = EXCLUDED.claim_id,
        record = EXCLUDED.record, expires_at = EXCLUDED.expires_at
    WHERE t.expires_at <= extract(epoch from clock_timestamp())::float8;
    IF NOT FOUND THEN
        SELECT t.record INTO found_record FROM authority_idem t WHERE t.key = p_key;
        IF NOT FOUND THEN
            RAISE EXCEPTION 'an idempotency row vanished under its lock';
        END IF;
        RETURN ARRAY[found_record, NULL];
    END IF;
    SELECT min(q.lim - CASE WHEN c.expires_at > extract(epoch from clock_timestamp())::float8
                            THEN c.used ELSE 0 END), count(c.name)
      INTO room, seen
      FROM unnest(names, limits) AS q(name, lim)
      LEFT JOIN authority_counters c ON c.name = q.name;
    IF seen <> coalesce(cardinality(names), 0) THEN
        RAISE EXCEPTION 'a counter row vanished under its lock';
    END IF;
    IF room < min_usd THEN
        RETURN ARRAY[NULL, NULL]::text[];
    END IF;
    granted := least(max_usd, room);
    -- Clamped, so float rounding of used + (limit - used) cannot pass the limit; a counter
    -- named twice keeps the lower of its two new values.
    UPDATE authority_counters AS c
       SET used = v.used, expires_at = extract(epoch from clock_timestamp())::float8 + budget_ttl
      FROM (SELECT q.name, min(least(u.used + granted, greatest(q.lim, u.used))) AS used
              FROM unnest(names, limits) AS q(name, lim)
              JOIN (SELECT c2.name,
                           CASE WHEN c2.expires_at > extract(epoch from clock_timestamp())::float8
                                THEN c2.used ELSE 0 END AS used
                      FROM authority_counters c2 WHERE c2.name = ANY(names)) AS u
                   USING (name)
             GROUP BY q.name) AS v
     WHERE c.name = v.name;
    RETURN ARRAY[NULL, granted::text];
END
$$;

CREATE OR REPLACE FUNCTION authority_state_batch(relax boolean, kinds text[], keys text[],
                                      expect text[], claim_ids text[], records text[],
                                      ttls double precision[], lo double precision[],
                                      hi double precision[], c_lo integer[],
                                      c_hi integer[], c_name text[],
                                      c_limit double precision[])
RETURNS text[]
LANGUAGE plpgsql SET plan_cache_mode = force_generic_plan AS $$
DECLARE
    out text[] := array_fill(NULL::text, ARRAY[cardinality(kinds)]);
    i integer;
    kind text;
    found_record text;
    room double precision;
    granted double precision;
    seen bigint;
BEGIN
    IF relax THEN
        PERFORM set_config('synchronous_commit', 'off', true);
    END IF;
    -- The counters' locks only (as authority_counters_lock takes them): every item reads
    -- the rows it needs itself.
    IF coalesce(cardinality(c_name), 0) > 0 THEN
        INSERT INTO authority_counters AS c (name, used, expires_at)
            SELECT DISTINCT n, 0::float8, 0::float8 FROM unnest(c_name) AS n ORDER BY n
            ON CONFLICT (name) DO UPDATE SET used = c.used WHERE false;
    END IF;
    FOR i IN 1 .. coalesce(cardinality(kinds), 0) LOOP
        kind := kinds[i];
        IF kind = 'claim' THEN
            -- An existing live row is locked and left as it is (the WHERE is false): the
            -- next statement, with a snapshot of its own, reads the record in the way.
            INSERT INTO authority_idem AS t (key, claim_id, record, expires_at)
            VALUES (keys[i], claim_ids[i], records[i],
                    extract(epoch from clock_timestamp())::float8 + ttls[i])
            ON CONFLICT (key) DO UPDATE SET claim_id = EXCLUDED.claim_id,
                record = EXCLUDED.record, expires_at = EXCLUDED.expires_at
            WHERE t.expires_at <= extract(epoch from clock_timestamp())::float8;
            IF NOT FOUND THEN
                SELECT t.record INTO found_record FROM authority_idem t WHERE t.key = keys[i];
                IF NOT FOUND THEN
                    RAISE EXCEPTION 'an idempotency row vanished under its lock';
                END IF;
                out[i] := found_record;
            END IF;
        ELSIF kind = 'replace' THEN
            UPDATE authority_idem SET claim_id = claim_ids[i], record = records[i],
                   expires_at = extract(epoch from clock_timestamp())::float8 + ttls[i]
             WHERE key = keys[i] AND claim_id = expect[i]
               AND expires_at > extract(epoch from clock_timestamp())::float8;
            out[i] := CASE WHEN FOUND THEN '1' ELSE '0' END;
        ELSIF kind = 'delete' THEN
            DELETE FROM authority_idem
             WHERE key = keys[i] AND claim_id = expect[i]
               AND expires_at > extract(epoch from clock_timestamp())::float8;
            out[i] := CASE WHEN FOUND THEN '1' ELSE '0' END;
        ELSIF kind = 'put' THEN
            INSERT INTO authority_idem (key, claim_id, record, expires_at)
            VALUES (keys[i], claim_ids[i], records[i],
                    extract(epoch from clock_timestamp())::float8 + ttls[i])
            ON CONFLICT (key) DO UPDATE SET claim_id = EXCLUDED.claim_id,
                record = EXCLUDED.record, expires_at = EXCLUDED.expires_at;
            out[i] := '1';
        ELSIF kind = 'reserve' THEN
            -- As authority_budget_reserve, on rows this batch already holds (and may have
            -- written: an earlier item's grant counts).
            SELECT min(q.lim - CASE WHEN c.expires_at
                                         > extract(epoch from clock_timestamp())::float8
                                    THEN c.used ELSE 0 END), count(c.name) INTO room, seen
              FROM unnest(c_name[c_lo[i]:c_hi[i]], c_limit[c_lo[i]:c_hi[i]]) AS q(name, lim)
              LEFT JOIN authority_counters c ON c.name = q.name;
            IF seen <> c_hi[i] - c_lo[i] + 1 THEN
                RAISE EXCEPTION 'a counter row vanished under its lock';
            END IF;
            IF room IS NULL OR room < lo[i] THEN
                CONTINUE;
            END IF;
            granted := least(hi[i], room);
            UPDATE authority_counters AS c
               SET used = v.used,
                   expires_at = extract(epoch from clock_timestamp())::float8 + ttls[i]
              FROM (SELECT q.name,
                           min(least(u.used + granted, greatest(q.lim, u.used))) AS used
                      FROM unnest(c_name[c_lo[i]:c_hi[i]], c_limit[c_lo[i]:c_hi[i]])
                           AS q(name, lim)
                      JOIN (SELECT c2.name,
                                   CASE WHEN c2.expires_at
                                             > extract(epoch from clock_timestamp())::float8
                                        THEN c2.used ELSE 0 END AS used
                              FROM authority_counters c2
                             WHERE c2.name = ANY(c_name[c_lo[i]:c_hi[i]])) AS u
                           USING (name)
                     GROUP BY q.name) AS v
             WHERE c.name = v.name;
            out[i] := granted::text;
        ELSIF kind = 'settle' THEN
            UPDATE authority_counters AS c
               SET used = greatest(CASE WHEN c.expires_at
                                             > extract(epoch from clock_timestamp())::float8
                                        THEN c.used ELSE 0 END + lo[i], 0),
                   expires_at = extract(epoch from clock_timestamp())::float8 + ttls[i]
             WHERE c.name = ANY(c_name[c_lo[i]:c_hi[i]]);
        ELSE
            RAISE EXCEPTION 'unknown batch item kind %', kind;
        END IF;
    END LOOP;
    RETURN out;
END
$$;
"""),
]

SCHEMA_VERSION = MIGRATIONS[-1][0]

_META = """
CREATE TABLE IF NOT EXISTS authority_meta (
    id smallint PRIMARY KEY DEFAULT 1 CHECK (id = 1),
    version integer NOT NULL,
    probed_at double precision
)
"""


def schema_version(cur: Any) -> int:
    """The version of the schema ``cur``'s connection sees (0: never migrated)."""
    cur.execute("SELECT to_regclass('authority_meta') IS NOT NULL")
    row = cur.fetchone()
    if not row or not row[0]:
        return 0
    cur.execute("SELECT version FROM authority_meta WHERE id = 1")
    row = cur.fetchone()
    return int(row[0]) if row else 0


def migrate(conn: Any) -> tuple[int, int]:
    """Bring the schema up to :data:`SCHEMA_VERSION`; returns ``(from, to)``.

    ``conn`` is a psycopg connection in autocommit mode; the whole upgrade is one
    transaction (PostgreSQL's DDL is transactional: a failed step leaves nothing).
    """
    with conn.transaction(), conn.cursor() as cur:
        cur.execute("SELECT current_schema()")
        row = cur.fetchone()
        if not row or row[0] is None:
            raise ValueError("no schema to migrate: the DSN's search_path names no "
                             "existing schema")
        # One migrator per schema at a time; released at commit or rollback.
        cur.execute("SELECT pg_advisory_xact_lock(hashtext('authority-migrate:' || "
                    "current_schema()))")
        cur.execute(_META)
        before = schema_version(cur)
        if before > SCHEMA_VERSION:
            raise ValueError(f"the database schema is at version {before}, newer than this "
                             f"gateway's {SCHEMA_VERSION}: upgrade the gateway")
        for version, sql in MIGRATIONS:
            if version > before:
                cur.execute(sql)
        cur.execute("INSERT INTO authority_meta (id, version) VALUES (1, %s) "
                    "ON CONFLICT (id) DO UPDATE SET version = EXCLUDED.version",
                    (SCHEMA_VERSION,))
    return before, SCHEMA_VERSION
