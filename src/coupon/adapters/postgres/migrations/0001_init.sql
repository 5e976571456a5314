-- The schema alone keeps I1 (no over-issue), I2 (unique codes), I3 (issued inside the
-- window) and I4 (one per user), whatever Redis says.

CREATE TABLE campaigns (
    id            uuid PRIMARY KEY,
    name          text        NOT NULL CHECK (char_length(name) BETWEEN 1 AND 200),
    total_coupons bigint      NOT NULL CHECK (total_coupons BETWEEN 1 AND 10000000),
    issued_count  bigint      NOT NULL DEFAULT 0,
    starts_at     timestamptz NOT NULL,
    -- 'infinity' rather than NULL: a foreign key ignores rows with a NULL column.
    ends_at       timestamptz NOT NULL DEFAULT 'infinity',
    created_at    timestamptz NOT NULL DEFAULT now(),
    CHECK (ends_at > starts_at),
    CHECK (issued_count BETWEEN 0 AND total_coupons),
    -- Target of the coupons' composite foreign key, which copies the stock and window
    -- into every coupon row so that plain CHECK constraints can guard them.
    UNIQUE (id, total_coupons, starts_at, ends_at)
);

CREATE TABLE coupons (
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    campaign_id   uuid        NOT NULL,
    total_coupons bigint      NOT NULL,
    starts_at     timestamptz NOT NULL,
    ends_at       timestamptz NOT NULL,
    slot          bigint      NOT NULL,
    code          text        NOT NULL,
    user_id       text        NOT NULL,
    issued_at     timestamptz NOT NULL,
    FOREIGN KEY (campaign_id, total_coupons, starts_at, ends_at)
        REFERENCES campaigns (id, total_coupons, starts_at, ends_at),
    -- I1: at most total_coupons distinct slots exist, and each is taken once.
    CONSTRAINT coupons_slot_in_stock CHECK (slot BETWEEN 1 AND total_coupons),
    CONSTRAINT coupons_slot_once UNIQUE (campaign_id, slot),
    -- I2
    CONSTRAINT coupons_code_unique UNIQUE (code),
    CONSTRAINT coupons_code_format CHECK (char_length(code) BETWEEN 1 AND 10),
    -- I3
    CONSTRAINT coupons_issued_in_window CHECK (issued_at >= starts_at AND issued_at < ends_at),
    -- I4
    CONSTRAINT coupons_one_per_user UNIQUE (campaign_id, user_id),
    CONSTRAINT coupons_user_id_length CHECK (char_length(user_id) BETWEEN 1 AND 128)
);

-- Issue order for GetCampaign's keyset pages.
CREATE INDEX coupons_campaign_issue_order ON coupons (campaign_id, id);

-- issued_count follows the rows, one update per inserting statement (a group commit is
-- one statement), so GetCampaign need not count a million rows.
CREATE FUNCTION coupons_count_issued() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE campaigns c
       SET issued_count = c.issued_count + n.added
      FROM (SELECT campaign_id, count(*) AS added FROM new_coupons GROUP BY campaign_id) n
     WHERE c.id = n.campaign_id;
    RETURN NULL;
END
$$;

CREATE TRIGGER coupons_count_issued
    AFTER INSERT ON coupons
    REFERENCING NEW TABLE AS new_coupons
    FOR EACH STATEMENT EXECUTE FUNCTION coupons_count_issued();

CREATE FUNCTION coupons_uncount_issued() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE campaigns c
       SET issued_count = c.issued_count - n.removed
      FROM (SELECT campaign_id, count(*) AS removed FROM old_coupons GROUP BY campaign_id) n
     WHERE c.id = n.campaign_id;
    RETURN NULL;
END
$$;

CREATE TRIGGER coupons_uncount_issued
    AFTER DELETE ON coupons
    REFERENCING OLD TABLE AS old_coupons
    FOR EACH STATEMENT EXECUTE FUNCTION coupons_uncount_issued();

-- Codes are a keyed permutation of a global sequence (see coupon/domain/codes.py). Each
-- server process reserves blocks of sequence numbers; the key is made once, here, so every
-- process and every restart uses the same permutation.
CREATE SEQUENCE coupon_code_blocks AS bigint START 1;

CREATE TABLE code_key (
    id  int PRIMARY KEY CHECK (id = 1),
    key bytea NOT NULL CHECK (length(key) = 32)
);

INSERT INTO code_key (id, key)
VALUES (1, decode(replace(gen_random_uuid()::text || gen_random_uuid()::text, '-', ''), 'hex'));
