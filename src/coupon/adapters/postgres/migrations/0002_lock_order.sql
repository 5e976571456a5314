-- Two group commits touching the same campaigns could update their rows in different
-- orders and deadlock; lock the campaign rows in id order first.
CREATE OR REPLACE FUNCTION coupons_count_issued() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM 1 FROM campaigns WHERE id IN (SELECT campaign_id FROM new_coupons)
     ORDER BY id FOR NO KEY UPDATE;
    UPDATE campaigns c
       SET issued_count = c.issued_count + n.added
      FROM (SELECT campaign_id, count(*) AS added FROM new_coupons GROUP BY campaign_id) n
     WHERE c.id = n.campaign_id;
    RETURN NULL;
END
$$;

CREATE OR REPLACE FUNCTION coupons_uncount_issued() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM 1 FROM campaigns WHERE id IN (SELECT campaign_id FROM old_coupons)
     ORDER BY id FOR NO KEY UPDATE;
    UPDATE campaigns c
       SET issued_count = c.issued_count - n.removed
      FROM (SELECT campaign_id, count(*) AS removed FROM old_coupons GROUP BY campaign_id) n
     WHERE c.id = n.campaign_id;
    RETURN NULL;
END
$$;
