-- CreateCampaign's request_id: a create sent again with the same request_id (its answer was
-- lost, it timed out, a proxy answered 503) answers the campaign the first one created
-- instead of creating another. Kept as long as the campaign. The unique constraint, not a
-- look-up before the insert, is what makes concurrent creates with one request_id, from
-- any number of server processes and instances, store one campaign: the service inserts
-- with ON CONFLICT (request_id) DO NOTHING and reads the campaign already there.
--
-- NULL (none) for the campaigns already there and for creates without one: NULLs are
-- distinct, so any number of them. Adding the column writes nothing; the constraints read
-- the campaigns table, one row per campaign.
ALTER TABLE campaigns ADD COLUMN request_id text
    CONSTRAINT campaigns_request_id_length CHECK (char_length(request_id) BETWEEN 1 AND 128);
ALTER TABLE campaigns ADD CONSTRAINT campaigns_request_id_once UNIQUE (request_id);
