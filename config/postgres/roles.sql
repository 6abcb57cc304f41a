-- Least-privilege PostgreSQL roles for cnc-monitor.
--
-- cnc_migrator owns the tables and runs `cnc-backend migrate`.
-- cnc_writer is the role `cnc-backend run` logs in as: it may read and
-- insert readings and dead letters, and nothing else.
--
-- Step 1, before the first migration: run this file as a superuser in the
-- database that will hold the readings, then give both roles a password.
--
--   psql -v ON_ERROR_STOP=1 -d cnc -f config/postgres/roles.sql
--   psql -d cnc -c '\password cnc_migrator'
--   psql -d cnc -c '\password cnc_writer'
--
-- Step 2: `cnc-backend migrate` with postgres.dsn naming cnc_migrator.
-- Step 3: run config/postgres/grants.sql as a superuser or as cnc_migrator.
--
-- With scram-sha-256 in pg_hba.conf (the default password_encryption since
-- PostgreSQL 14) no password crosses the network in the clear. Add sslmode =
-- "verify-full" in backend.toml to also encrypt the readings and check the
-- server certificate.

CREATE ROLE cnc_migrator LOGIN;
CREATE ROLE cnc_writer LOGIN;

-- Besides superusers, only these two roles may connect. TEMPORARY lets the
-- writer create its session-local staging table for COPY.
DO $$
BEGIN
    EXECUTE format('REVOKE ALL ON DATABASE %I FROM PUBLIC', current_database());
    EXECUTE format(
        'GRANT CONNECT, TEMPORARY ON DATABASE %I TO cnc_migrator, cnc_writer',
        current_database()
    );
END
$$;

-- PostgreSQL 15 and later already deny CREATE in schema public to PUBLIC.
-- Older versions allow it, so it is revoked here explicitly.
REVOKE CREATE ON SCHEMA public FROM PUBLIC;
GRANT USAGE, CREATE ON SCHEMA public TO cnc_migrator;
GRANT USAGE ON SCHEMA public TO cnc_writer;
