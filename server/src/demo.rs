//! Deterministic demo data: the API reference's example records for
//! `user_456` in `company_123`, plus generated users in several companies,
//! each with about N records across the data types. Loads a million
//! records in one transaction with batched inserts.

use anyhow::Context as _;

use crate::datatypes::Registry;
use crate::store::{Engine, Store};

/// Companies generated users belong to (user_456's own is `company_123`).
pub const COMPANIES: [&str; 3] = ["company_123", "company_456", "company_789"];

/// What was loaded.
#[derive(Debug, Default, Clone, Copy)]
pub struct Loaded {
    pub users: u64,
    pub records: u64,
}

/// SplitMix64: small, fast, deterministic.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[self.below(items.len() as u64) as usize]
    }
}

fn ts(seconds_since_2024: u64) -> String {
    let t = time::macros::datetime!(2024-01-01 00:00 UTC)
        + time::Duration::seconds(seconds_since_2024 as i64);
    handover::model::format_timestamp(t)
}

type Row = Vec<Option<String>>;

struct Tables {
    users: Vec<Row>,
    payments: Vec<Row>,
    memberships: Vec<Row>,
    cases: Vec<Row>,
    actions: Vec<Row>,
    consents: Vec<Row>,
}

impl Tables {
    fn new() -> Self {
        Self {
            users: vec![],
            payments: vec![],
            memberships: vec![],
            cases: vec![],
            actions: vec![],
            consents: vec![],
        }
    }
    /// Each table with its rows, in an order that satisfies references.
    fn by_table(&self) -> [(&'static str, &[Row]); 6] {
        [
            ("demo_users", &self.users),
            ("demo_payments", &self.payments),
            ("demo_memberships", &self.memberships),
            ("demo_recovery_cases", &self.cases),
            ("demo_recovery_actions", &self.actions),
            ("demo_consents", &self.consents),
        ]
    }
    fn len(&self) -> usize {
        self.users.len()
            + self.payments.len()
            + self.memberships.len()
            + self.cases.len()
            + self.consents.len()
    }
}

fn s(v: &str) -> Option<String> {
    Some(v.to_string())
}

fn seed_examples(t: &mut Tables) {
    t.users.push(vec![
        s("user_456"),
        s("company_123"),
        s("user@example.com"),
        s("username"),
        s("Display Name"),
        s("https://example.com/avatar.jpg"),
        s("America/New_York"),
        s("en"),
        s("2025-01-01T00:00:00Z"),
        s("2025-10-25T19:50:00.000Z"),
    ]);
    t.payments.push(vec![
        s("payment_123"),
        s("user_456"),
        s("company_123"),
        s("membership_789"),
        s("2999"),
        s("USD"),
        s("succeeded"),
        s("credit_card"),
        None,
        s("2025-10-24T19:50:00.000Z"),
    ]);
    t.memberships.push(vec![
        s("membership_789"),
        s("user_456"),
        s("company_123"),
        s("plan_premium"),
        s("active"),
        s("2025-01-01T00:00:00Z"),
        None,
        s("2025-12-31T23:59:59.000Z"),
    ]);
    t.cases.push(vec![
        s("case_123"),
        s("user_456"),
        s("membership_789"),
        s("company_123"),
        s("recovered"),
        s("2"),
        s("3"),
        s("2999"),
        s("payment_failed"),
        s("2025-10-20T19:50:00.000Z"),
        s("2025-10-24T19:50:00.000Z"),
    ]);
    t.actions.push(vec![
        s("case_123"),
        s("nudge_push"),
        s("2025-10-21T19:50:00.000Z"),
    ]);
    for c in ["data_processing", "marketing_emails"] {
        t.consents.push(vec![
            s("user_456"),
            s("company_123"),
            s(c),
            s("1"),
            s("2025-01-01T00:00:00.000Z"),
            None,
        ]);
    }
}

/// Generates about `records` records for `user` in `company`.
fn generate_user(
    t: &mut Tables,
    rng: &mut Rng,
    user: &str,
    company: &str,
    records: u64,
    with_profile: bool,
) {
    if with_profile {
        let n = rng.below(10_000);
        t.users.push(vec![
            s(user),
            s(company),
            Some(format!("{user}@example.com")),
            Some(format!("{user}_{n}")),
            Some(format!("Demo User {n}")),
            None,
            s(rng.pick(&["Europe/Berlin", "America/New_York", "Asia/Tokyo"])),
            s(rng.pick(&["en", "de", "ja"])),
            Some(ts(rng.below(30_000_000))),
            Some(ts(40_000_000 + rng.below(20_000_000))),
        ]);
        for c in ["data_processing", "marketing_emails", "product_updates"] {
            let granted = rng.below(4) != 0;
            t.consents.push(vec![
                s(user),
                s(company),
                s(c),
                Some(u8::from(granted).to_string()),
                Some(ts(rng.below(10_000_000))),
                (!granted).then(|| ts(20_000_000 + rng.below(10_000_000))),
            ]);
        }
    }
    let memberships = (records / 20).clamp(1, 50);
    let cases = records / 10;
    let payments = records.saturating_sub(memberships + cases + u64::from(with_profile) * 2);
    let key = format!("{user}_{company}");
    for m in 0..memberships {
        let status = rng.pick(&["active", "cancelled", "expired", "past_due"]);
        let start = rng.below(50_000_000);
        t.memberships.push(vec![
            Some(format!("mem_{key}_{m:05}")),
            s(user),
            s(company),
            s(rng.pick(&["plan_basic", "plan_premium", "plan_team"])),
            s(status),
            Some(ts(start)),
            (status == "cancelled").then(|| ts(start + 5_000_000)),
            Some(ts(start + 31_536_000)),
        ]);
    }
    for c in 0..cases {
        let m = rng.below(memberships);
        let recovered = rng.below(3) != 0;
        let first = rng.below(55_000_000);
        let id = format!("case_{key}_{c:07}");
        for a in 0..=rng.below(3) {
            t.actions.push(vec![
                Some(id.clone()),
                s(rng.pick(&["nudge_push", "nudge_email", "discount_offer", "sms"])),
                Some(ts(first + 86_400 * (a + 1))),
            ]);
        }
        t.cases.push(vec![
            Some(id),
            s(user),
            Some(format!("mem_{key}_{m:05}")),
            s(company),
            s(if recovered {
                "recovered"
            } else {
                rng.pick(&["open", "lost"])
            }),
            Some((1 + rng.below(4)).to_string()),
            Some(rng.below(8).to_string()),
            recovered.then(|| (999 + rng.below(9000)).to_string()),
            s(rng.pick(&["payment_failed", "card_expired", "insufficient_funds"])),
            Some(ts(first)),
            recovered.then(|| ts(first + 400_000)),
        ]);
    }
    for p in 0..payments {
        let status = rng.pick(&["succeeded", "succeeded", "succeeded", "failed", "refunded"]);
        t.payments.push(vec![
            Some(format!("pay_{key}_{p:07}")),
            s(user),
            s(company),
            Some(format!("mem_{key}_{:05}", rng.below(memberships))),
            Some((499 + rng.below(20_000)).to_string()),
            s(rng.pick(&["USD", "EUR", "GBP"])),
            s(status),
            s(rng.pick(&["credit_card", "sepa_debit", "paypal"])),
            (status == "failed").then(|| "card_declined".to_string()),
            Some(ts(p * 600 + rng.below(600))),
        ]);
    }
}

/// Inserts the generated rows into SQLite (rusqlite: one transaction, one
/// prepared statement per table).
fn insert_sqlite(path: &std::path::Path, t: &Tables) -> anyhow::Result<()> {
    let mut conn = rusqlite::Connection::open(path)
        .with_context(|| format!("opening {} for the demo data", path.display()))?;
    conn.busy_timeout(std::time::Duration::from_secs(15))?;
    let tx = conn.transaction()?;
    for (table, rows) in t.by_table() {
        let Some(first) = rows.first() else { continue };
        let marks = vec!["?"; first.len()].join(", ");
        let mut st = tx.prepare(&format!("INSERT OR IGNORE INTO {table} VALUES ({marks})"))?;
        for row in rows {
            st.execute(rusqlite::params_from_iter(row.iter()))
                .with_context(|| format!("inserting into {table}"))?;
        }
    }
    tx.commit()?;
    Ok(())
}

/// One value in PostgreSQL's COPY text format.
fn copy_field(out: &mut String, v: Option<&str>) {
    let Some(v) = v else {
        out.push_str("\\N");
        return;
    };
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\t' => out.push_str("\\t"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            c => out.push(c),
        }
    }
}

/// Inserts the generated rows into PostgreSQL: COPY into a temporary table
/// per table, then one INSERT … ON CONFLICT DO NOTHING (so loading twice
/// adds nothing), in one transaction.
async fn insert_postgres(url: &str, t: &Tables) -> anyhow::Result<()> {
    use sqlx::Connection as _;
    let mut conn = sqlx::PgConnection::connect(url)
        .await
        .context("connecting to PostgreSQL for the demo data")?;
    let mut tx = conn.begin().await?;
    for (table, rows) in t.by_table() {
        sqlx::raw_sql(&format!(
            "CREATE TEMPORARY TABLE load_{table} (LIKE {table} INCLUDING DEFAULTS) ON COMMIT DROP"
        ))
        .execute(&mut *tx)
        .await?;
        let mut copy = tx
            .copy_in_raw(&format!("COPY load_{table} FROM STDIN"))
            .await
            .with_context(|| format!("copying into {table}"))?;
        let mut buf = String::new();
        for row in rows {
            for (i, v) in row.iter().enumerate() {
                if i > 0 {
                    buf.push('\t');
                }
                copy_field(&mut buf, v.as_deref());
            }
            buf.push('\n');
            if buf.len() > 1 << 20 {
                copy.send(std::mem::take(&mut buf).into_bytes()).await?;
            }
        }
        if !buf.is_empty() {
            copy.send(buf.into_bytes()).await?;
        }
        copy.finish()
            .await
            .with_context(|| format!("copying into {table}"))?;
        sqlx::raw_sql(&format!(
            "INSERT INTO {table} SELECT * FROM load_{table} ON CONFLICT DO NOTHING"
        ))
        .execute(&mut *tx)
        .await
        .with_context(|| format!("inserting into {table}"))?;
    }
    tx.commit().await?;
    // Statistics now, not when autovacuum gets round to it: the first
    // exports of a freshly loaded demo must not be planned blind.
    for (table, _) in t.by_table() {
        sqlx::raw_sql(&format!("ANALYZE {table}"))
            .execute(&mut conn)
            .await
            .with_context(|| format!("analysing {table}"))?;
    }
    Ok(())
}

/// Whether the demo tables hold any user yet (false when they do not exist).
pub async fn has_data(store: &Store, registry: &Registry) -> bool {
    let table = match registry.demo.as_ref().map(|d| d.generator.as_str()) {
        Some("sql") => "pomo_users",
        _ => "demo_users",
    };
    store
        .count(&format!("SELECT COUNT(*) FROM {table}"))
        .await
        .is_some_and(|n| n > 0)
}

/// Loads the demo data of `registry`'s config into the database of `url`
/// (the store's): `users` generated users and about `records` records each
/// (user_456 gets the same on top of the reference's examples). Same
/// arguments, same data; loading twice adds nothing.
///
/// # Errors
///
/// A config without a `[demo]` section, or database errors.
pub async fn load(
    store: &Store,
    url: &str,
    registry: &Registry,
    users: u64,
    records: u64,
    seed: u64,
) -> anyhow::Result<Loaded> {
    let demo = registry
        .demo
        .as_ref()
        .context("this data type config has no [demo] section")?;
    store
        .execute_script(&demo.schema)
        .await
        .context("creating the demo tables")?;
    if demo.generator == "sql" {
        let seed_sql = demo
            .seed
            .as_deref()
            .context("[demo] generator = \"sql\" needs seed")?;
        store
            .execute_script(seed_sql)
            .await
            .context("running the demo seed SQL")?;
        return Ok(Loaded {
            users: 2,
            records: 0,
        });
    }
    anyhow::ensure!(
        demo.generator == "seed-004",
        "unknown demo generator {:?}",
        demo.generator
    );
    let mut rng = Rng(seed);
    let mut t = Tables::new();
    seed_examples(&mut t);
    generate_user(&mut t, &mut rng, "user_456", "company_123", records, false);
    // user_456 also belongs to a second company, with data of its own.
    generate_user(
        &mut t,
        &mut rng,
        "user_456",
        "company_456",
        (records / 10).max(5),
        true,
    );
    for u in 1..=users {
        let company = COMPANIES[(u as usize) % COMPANIES.len()];
        generate_user(
            &mut t,
            &mut rng,
            &format!("user_{u:04}"),
            company,
            records,
            true,
        );
    }
    let total = t.len() as u64;
    match store.engine() {
        Engine::Sqlite => {
            let path = crate::source::sqlite::path_of(url)?;
            tokio::task::spawn_blocking(move || insert_sqlite(&path, &t)).await??;
        }
        Engine::Postgres => insert_postgres(url, &t).await?,
    }
    Ok(Loaded {
        users: users + 1,
        records: total,
    })
}
