-- The kill switch (EndCampaign) and a user's coupons across campaigns (ListUserCoupons).
--
-- The end of issuance is a column of its own. ends_at stays what the campaign was created
-- with: every coupon row carries a copy of it, which the insert's statement trigger compares
-- with the campaign row, so changing it would refuse the inserts in flight.
ALTER TABLE campaigns ADD COLUMN ended_at timestamptz;

-- An end, once recorded, stays: ending again keeps the first end time.
CREATE FUNCTION campaigns_keep_end() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF OLD.ended_at IS NOT NULL AND NEW.ended_at IS DISTINCT FROM OLD.ended_at THEN
        RAISE EXCEPTION 'campaign % ended at %: its end cannot change', OLD.id, OLD.ended_at
            USING ERRCODE = 'check_violation', TABLE = 'campaigns',
                  CONSTRAINT = 'campaigns_end_once';
    END IF;
    RETURN NEW;
END
$$;

CREATE TRIGGER campaigns_keep_end
    BEFORE UPDATE OF ended_at ON campaigns
    FOR EACH ROW EXECUTE FUNCTION campaigns_keep_end();

-- Nothing is issued at or after the end, whatever the gate said: the statement trigger has
-- locked the campaign rows (as before) before it compares, so an end recorded concurrently
-- is either committed and seen here, or waits for this insert to commit. Requests admitted
-- before the end carry an issued_at before it and go in.
CREATE OR REPLACE FUNCTION coupons_count_issued() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM 1 FROM campaigns WHERE id IN (SELECT campaign_id FROM new_coupons)
     ORDER BY id FOR NO KEY UPDATE;
    IF EXISTS (
        SELECT 1
          FROM (SELECT DISTINCT campaign_id, total_coupons, starts_at, ends_at
                  FROM new_coupons) n
         WHERE NOT EXISTS (
               SELECT 1 FROM campaigns c
                WHERE c.id = n.campaign_id AND c.total_coupons = n.total_coupons
                  AND c.starts_at = n.starts_at AND c.ends_at = n.ends_at))
    THEN
        RAISE EXCEPTION 'a coupon does not carry its campaign''s stock and window'
            USING ERRCODE = 'foreign_key_violation', TABLE = 'coupons',
                  CONSTRAINT = 'coupons_campaign_match';
    END IF;
    IF EXISTS (
        SELECT 1
          FROM (SELECT campaign_id, max(issued_at) AS last FROM new_coupons
                 GROUP BY campaign_id) n
          JOIN campaigns c ON c.id = n.campaign_id
         WHERE n.last >= c.ended_at)
    THEN
        RAISE EXCEPTION 'a coupon was issued at or after its campaign ended'
            USING ERRCODE = 'check_violation', TABLE = 'coupons',
                  CONSTRAINT = 'coupons_issued_before_end';
    END IF;
    UPDATE campaigns c
       SET issued_count = c.issued_count + n.added
      FROM (SELECT campaign_id, count(*) AS added FROM new_coupons GROUP BY campaign_id) n
     WHERE c.id = n.campaign_id;
    RETURN NULL;
END
$$;

-- ListUserCoupons reads a user's coupons newest campaign first: WHERE user_id = $1 AND
-- campaign_id < $2 ORDER BY campaign_id DESC. The one-per-user constraint (I4) now leads
-- with the user, so that read is one range of it; the uniqueness is the same, and the
-- lookups by (campaign_id, user_id) the issue path makes are equalities on both columns,
-- which it serves as well. Swapped rather than joined by a second index: every insert
-- would pay for one more btree.
--
-- Rebuilding the constraint reads the whole table under an exclusive lock: run it between
-- campaigns on a large table.
ALTER TABLE coupons DROP CONSTRAINT coupons_one_per_user;
ALTER TABLE coupons ADD CONSTRAINT coupons_one_per_user UNIQUE (user_id, campaign_id);
