//! The conformance suite on PostgreSQL, each test on a schema of its own. The server's URL is
//! read from `KEEL_TEST_POSTGRES_URL`; without it every test says that it skips (and fails
//! when `KEEL_REQUIRE_POSTGRES=1`).

use keel_store::conformance::postgres::fresh_store as fresh;

keel_store::conformance_tests!(fresh);
keel_store::notification_conformance_tests!(fresh);
