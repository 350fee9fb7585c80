DROP TABLE IF EXISTS sb_state;
CREATE TABLE sb_state (device_id text COLLATE "C" PRIMARY KEY, event_id text NOT NULL, event_type text NOT NULL, ts timestamptz NOT NULL, received_at timestamptz NOT NULL, payload jsonb, first_seen timestamptz NOT NULL, events bigint NOT NULL);
INSERT INTO sb_state SELECT 'dev-' || i, 'e' || i, 'gps', now(), now(), '{"temp": 21.5, "lat": 52.1, "lon": 4.3, "n": 1}', now(), 1 FROM generate_series(0, 9999) i;
VACUUM ANALYZE sb_state;
DROP TABLE IF EXISTS sb_events;
CREATE TABLE sb_events (event_id text PRIMARY KEY, device_id text NOT NULL, event_type text NOT NULL, ts timestamptz NOT NULL, received_at timestamptz NOT NULL, payload jsonb);
