BEGIN;
CREATE TEMP TABLE IF NOT EXISTS sb_stage (event_id text, device_id text, event_type text, ts timestamptz, received_at timestamptz, payload jsonb, first_seen timestamptz, events bigint) ON COMMIT DELETE ROWS;
INSERT INTO sb_stage SELECT 'x' || g || random(), 'dev-' || g, 'gps', now(), now(), '{"temp": 21.5, "lat": 52.1, "lon": 4.3, "n": 2}', now(), 1 FROM (SELECT DISTINCT (random()*9999)::int AS g FROM generate_series(1, 5000)) d;
MERGE INTO sb_state s USING (SELECT * FROM sb_stage ORDER BY device_id) x ON s.device_id = x.device_id
 WHEN MATCHED THEN UPDATE SET event_id = CASE WHEN x.ts >= s.ts THEN x.event_id ELSE s.event_id END, event_type = CASE WHEN x.ts >= s.ts THEN x.event_type ELSE s.event_type END, received_at = CASE WHEN x.ts >= s.ts THEN x.received_at ELSE s.received_at END, payload = CASE WHEN x.ts >= s.ts THEN x.payload ELSE s.payload END, ts = GREATEST(s.ts, x.ts), first_seen = LEAST(s.first_seen, x.first_seen), events = s.events + x.events
 WHEN NOT MATCHED THEN INSERT VALUES (x.device_id, x.event_id, x.event_type, x.ts, x.received_at, x.payload, x.first_seen, x.events);
COMMIT;
