BEGIN;
CREATE TEMP TABLE IF NOT EXISTS sb_stage (event_id text, device_id text, event_type text, ts timestamptz, received_at timestamptz, payload jsonb, first_seen timestamptz, events bigint) ON COMMIT DELETE ROWS;
INSERT INTO sb_stage SELECT 'x' || g || random(), 'dev-' || g, 'gps', now(), now(), '{"temp": 21.5, "lat": 52.1, "lon": 4.3, "n": 2}', now(), 1 FROM (SELECT DISTINCT (random()*9999)::int AS g FROM generate_series(1, 5000)) d;
INSERT INTO sb_state AS s SELECT device_id, event_id, event_type, ts, received_at, payload, first_seen, events FROM sb_stage ORDER BY device_id
 ON CONFLICT (device_id) DO UPDATE SET event_id = CASE WHEN excluded.ts >= s.ts THEN excluded.event_id ELSE s.event_id END, event_type = CASE WHEN excluded.ts >= s.ts THEN excluded.event_type ELSE s.event_type END, received_at = CASE WHEN excluded.ts >= s.ts THEN excluded.received_at ELSE s.received_at END, payload = CASE WHEN excluded.ts >= s.ts THEN excluded.payload ELSE s.payload END, ts = GREATEST(s.ts, excluded.ts), first_seen = LEAST(s.first_seen, excluded.first_seen), events = s.events + excluded.events;
COMMIT;
