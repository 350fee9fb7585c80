BEGIN;
CREATE TEMP TABLE IF NOT EXISTS sb_stage (event_id text, device_id text, event_type text, ts timestamptz, received_at timestamptz, payload jsonb, first_seen timestamptz, events bigint) ON COMMIT DELETE ROWS;
INSERT INTO sb_stage SELECT 'x' || g || random(), 'dev-' || g, 'gps', now(), now(), '{"temp": 21.5, "lat": 52.1, "lon": 4.3, "n": 2}', now(), 1 FROM (SELECT DISTINCT (random()*9999)::int AS g FROM generate_series(1, 5000)) d;
COMMIT;
