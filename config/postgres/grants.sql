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
