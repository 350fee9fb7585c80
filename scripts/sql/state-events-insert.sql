BEGIN;
INSERT INTO sb_events SELECT 'x' || g || '-' || random(), 'dev-' || (random()*9999)::int, 'gps', now(), now(), '{"temp": 21.5, "lat": 52.1, "lon": 4.3, "n": 2}' FROM generate_series(1, 5000) g;
COMMIT;
