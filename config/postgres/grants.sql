-- Table privileges of cnc_writer, granted after `cnc-backend migrate` has
-- created the tables as cnc_migrator (see roles.sql). Run it again after a
-- migration that adds a table the backend writes.
--
--   psql -v ON_ERROR_STOP=1 -d cnc -f config/postgres/grants.sql

GRANT SELECT, INSERT ON readings, dead_letters TO cnc_writer;
GRANT USAGE ON SEQUENCE dead_letters_id_seq TO cnc_writer;
-- The backend checks the schema version at every connect and applies nothing
-- when it is current, so the writer needs to read this table only.
GRANT SELECT ON schema_migrations TO cnc_writer;

-- Coverage ledger (migration 2). The writer merges spans, so it may change
-- and delete ledger rows, and it re-anchors the time of readings recorded
-- while the host clock was not synchronised, so it may update those two
-- columns of readings and nothing else.
GRANT SELECT, INSERT ON readings_reduced, loss_reports, clock_reanchors TO cnc_writer;
GRANT SELECT, INSERT, UPDATE, DELETE ON coverage_spans, clock_anchors TO cnc_writer;
GRANT UPDATE (event_ts, reanchored) ON readings TO cnc_writer;
GRANT USAGE ON SEQUENCE loss_reports_id_seq, clock_reanchors_id_seq TO cnc_writer;
GRANT SELECT ON coverage TO cnc_writer;
