//! S2, S3, S5 and S7: the same code for every store, through the public API only
//! (`fencelock::connect(url)` and [`Locker`]); only the URL differs. Each store's
//! servers are started from the conformance harness for these scenarios and stopped
//! after them.
//!
//! - **S2** `clients` tasks, each taking and releasing a name of its own.
//! - **S3** one hot lock, 1/8/64 contenders holding it 0 or 1 ms per grant:
//!   throughput, Jain's fairness over the grants per contender, p99 and max wait.
//! - **S5** many locks held at once by one `Locker` in a child process (so its
//!   resident memory is its own), renewed by the watchdog; renewal requests per
//!   second as the server counts them, where it does; locks lost.
//! - **S7** a holder in a process of its own (the conformance worker) killed with
//!   SIGKILL; the time until a waiting client is granted, against what bounds it (the
//!   lease TTL, or the session timeout).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use fencelock::{Error, Locker};
use fencelock_conformance::harness::{
    EtcdServer, MariaDb, Postgres, RedisPersistence, RedisServer, Server, ZooKeeper,
};
use fencelock_conformance::worker::{Acquired, Worker};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::task::JoinSet;

use crate::measure::{Result, Samples};
use crate::report::{Distinct, HeldMany, HotLock, Report, Takeover, jain};

/// The lease of S2 and S3 grants.
const TTL: Duration = Duration::from_secs(10);

/// The longest a contender of S3 waits for one grant before counting a timeout.
const S3_WAIT: Duration = Duration::from_secs(30);

/// The longest one scenario step (a cycle, a hold, a child) may run past its plan.
const STEP_LIMIT: Duration = Duration::from_secs(120);

/// Server sessions shared by the clients of S2 and S3: client `i` uses locker
/// `i % LOCKERS`, so 64 clients do not open 64 connection pools.
const LOCKERS: usize = 8;

/// Session-mode SQL stores hold a server connection per held lock: S5 holds at most
/// this many there (the harness servers allow 200 and 500 connections).
const SESSION_LOCKS: usize = 100;

/// How big each scenario is.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Sizes {
    s2_clients: usize,
    s2_cycles_per_client: usize,
    s2_budget: Duration,
    s3_contenders: &'static [usize],
    s3_holds_ms: &'static [u64],
    s3_run: Duration,
    s5_locks: usize,
    s5_ttl: Duration,
    s5_hold: Duration,
    s7_runs: usize,
    s7_ttl: Duration,
}

impl Sizes {
    /// Tiny: every scenario runs, nothing is measured well.
    pub(crate) const QUICK: Sizes = Sizes {
        s2_clients: 64,
        s2_cycles_per_client: 2,
        s2_budget: Duration::from_secs(5),
        s3_contenders: &[1, 8, 64],
        s3_holds_ms: &[0, 1],
        s3_run: Duration::from_millis(200),
        s5_locks: 100,
        s5_ttl: Duration::from_secs(3),
        // Two renewal periods (TTL / 3) and a little.
        s5_hold: Duration::from_millis(2_200),
        s7_runs: 1,
        s7_ttl: Duration::from_secs(2),
    };

    /// For the README.
    pub(crate) const FULL: Sizes = Sizes {
        s2_clients: 64,
        s2_cycles_per_client: 100,
        s2_budget: Duration::from_secs(10),
        s3_contenders: &[1, 8, 64],
        s3_holds_ms: &[0, 1],
        s3_run: Duration::from_secs(2),
        s5_locks: 10_000,
        s5_ttl: Duration::from_secs(10),
        // Six renewal periods; the 60 s would make the run exceed ~15 minutes.
        s5_hold: Duration::from_secs(20),
        s7_runs: 3,
        s7_ttl: Duration::from_secs(3),
    };
}

/// One store under test: its label, its URL and how its S7 is bounded.
struct Target {
    store: String,
    url: String,
    /// Options that make the session bound of S7 short, if the store has one.
    session_options: Option<&'static str>,
    counter: Counter,
    session_locks: bool,
}

/// Where the server counts requests for S5.
#[derive(Clone)]
enum Counter {
    Redis(Vec<String>),
    Etcd(std::net::SocketAddr),
    ZooKeeper(Arc<ZooKeeper>),
    Postgres(sqlx::PgPool),
    MariaDb(String),
    None(&'static str),
}

/// S2, S3, S5 and S7 for every store the harness runs, one store at a time.
/// `wanted` says which stores run, by the names of `--only` (Redlock goes with Redis).
pub(crate) async fn run(
    sizes: &Sizes,
    wanted: &dyn Fn(&str) -> bool,
    report: &mut Report,
) -> Result<()> {
    if sizes.s5_locks < Sizes::FULL.s5_locks || sizes.s5_hold < Duration::from_secs(60) {
        report.notes.push(format!(
            "S5 held {} locks for {:?} with a {:?} TTL (a full soak would hold 10,000 for 60 s); \
             session-mode SQL stores hold at most {SESSION_LOCKS} (one server connection each).",
            sizes.s5_locks, sizes.s5_hold, sizes.s5_ttl
        ));
    }
    if wanted("redis") {
        let redis = RedisServer::start().await?;
        let target = Target {
            store: "redis".into(),
            url: redis.url(),
            session_options: None,
            counter: Counter::Redis(vec![redis.url()]),
            session_locks: false,
        };
        run_store(&target, sizes, report).await?;
    }
    if wanted("redis") {
        let nodes = RedisServer::start_many(5, RedisPersistence::None).await?;
        let addrs: Vec<String> = nodes.iter().map(|n| n.addr().to_string()).collect();
        let target = Target {
            store: "redlock (5 nodes)".into(),
            url: format!(
                "redlock://{}{}",
                addrs.join(","),
                crate::redis::REDLOCK_OPTIONS
            ),
            session_options: None,
            counter: Counter::Redis(nodes.iter().map(Server::url).collect()),
            session_locks: false,
        };
        run_store(&target, sizes, report).await?;
    }
    if wanted("etcd") {
        let etcd = EtcdServer::start().await?;
        let target = Target {
            store: "etcd".into(),
            url: etcd.url(),
            session_options: Some("session_ttl"),
            counter: Counter::Etcd(etcd.addr()),
            session_locks: false,
        };
        run_store(&target, sizes, report).await?;
    }
    if wanted("zookeeper") {
        let zk = Arc::new(ZooKeeper::start().await?);
        let target = Target {
            store: "zookeeper".into(),
            url: zk.url(),
            session_options: Some("session_timeout"),
            counter: Counter::ZooKeeper(Arc::clone(&zk)),
            session_locks: false,
        };
        run_store(&target, sizes, report).await?;
    }
    if wanted("postgres") {
        let mut pg = Postgres::start().await?;
        let admin = crate::sql::pg_admin(&mut pg).await?;
        for (mode, query) in [("lease", ""), ("session", "?mode=session")] {
            let target = Target {
                store: format!("postgres ({mode})"),
                url: format!("{}{query}", pg.url()),
                session_options: None,
                counter: Counter::Postgres(admin.clone()),
                session_locks: mode == "session",
            };
            run_store(&target, sizes, report).await?;
        }
    }
    if wanted("mariadb") {
        let maria = MariaDb::start().await?;
        for (mode, query) in [("lease", ""), ("session", "?mode=session")] {
            let target = Target {
                store: format!("mariadb ({mode})"),
                url: format!("{}{query}", maria.url()),
                session_options: None,
                counter: Counter::MariaDb(maria.url()),
                session_locks: mode == "session",
            };
            run_store(&target, sizes, report).await?;
        }
    }
    if wanted("sqlite") {
        let dir = tempfile::tempdir()?;
        let target = Target {
            store: "sqlite".into(),
            url: format!("sqlite://{}", dir.path().join("locks.db").display()),
            session_options: None,
            counter: Counter::None("not counted: SQLite runs in the client"),
            session_locks: false,
        };
        run_store(&target, sizes, report).await?;
    }
    Ok(())
}

async fn run_store(target: &Target, sizes: &Sizes, report: &mut Report) -> Result<()> {
    eprintln!("  scenarios on {}", target.store);
    report.distinct.push(s2(target, sizes).await?);
    for &contenders in sizes.s3_contenders {
        for &hold_ms in sizes.s3_holds_ms {
            report
                .hot_lock
                .push(s3(target, contenders, hold_ms, sizes.s3_run).await?);
        }
    }
    report.held_many.push(s5(target, sizes).await?);
    report.takeovers.push(s7(target, sizes).await?);
    Ok(())
}

async fn lockers(url: &str, count: usize) -> Result<Vec<Locker>> {
    let mut lockers = Vec::with_capacity(count);
    for _ in 0..count {
        lockers.push(fencelock::connect(url).await?);
    }
    Ok(lockers)
}

/// S2: every client takes and releases a name of its own, as fast as it can.
async fn s2(target: &Target, sizes: &Sizes) -> Result<Distinct> {
    let lockers = lockers(&target.url, LOCKERS.min(sizes.s2_clients)).await?;
    let started = Instant::now();
    let mut clients = JoinSet::new();
    for client in 0..sizes.s2_clients {
        let locker = lockers[client % lockers.len()].clone();
        let (cycles, budget) = (sizes.s2_cycles_per_client, sizes.s2_budget);
        clients.spawn(async move {
            let name = format!("bench-s2-{client}");
            let mut took = Vec::with_capacity(cycles);
            for _ in 0..cycles {
                let start = Instant::now();
                let guard = locker.lock(&name).ttl(TTL).no_wait().await?;
                guard.release().await?;
                took.push(start.elapsed());
                if started.elapsed() > budget {
                    break;
                }
            }
            Ok::<_, Error>(took)
        });
    }
    let mut samples = Samples::default();
    while let Some(done) = bounded(clients.join_next(), "S2", &target.store).await? {
        for took in done?? {
            samples.push(took);
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    Ok(Distinct {
        store: target.store.clone(),
        clients: sizes.s2_clients,
        cycles: samples.len(),
        seconds,
        per_second: samples.len() as f64 / seconds,
        p99_us: samples.percentile(99.0),
    })
}

/// S3: `contenders` clients take one lock in turn for `run`, each holding it
/// `hold_ms` per grant.
async fn s3(target: &Target, contenders: usize, hold_ms: u64, run: Duration) -> Result<HotLock> {
    static ROUND: AtomicUsize = AtomicUsize::new(0);
    let name = format!("bench-s3-{}", ROUND.fetch_add(1, Ordering::Relaxed));
    let lockers = lockers(&target.url, LOCKERS.min(contenders)).await?;
    let hold = Duration::from_millis(hold_ms);
    let started = Instant::now();
    let mut tasks = JoinSet::new();
    for contender in 0..contenders {
        let locker = lockers[contender % lockers.len()].clone();
        let name = name.clone();
        tasks.spawn(async move {
            let (mut waits, mut timeouts) = (Vec::new(), 0_usize);
            while started.elapsed() < run {
                let asked = Instant::now();
                match locker.lock(&name).ttl(TTL).wait(S3_WAIT).await {
                    Ok(guard) => {
                        waits.push(asked.elapsed());
                        if !hold.is_zero() {
                            tokio::time::sleep(hold).await;
                        }
                        guard.release().await?;
                    }
                    Err(Error::Timeout { .. }) => timeouts += 1,
                    Err(err) => return Err(err),
                }
            }
            Ok((waits, timeouts))
        });
    }
    let mut grants = Vec::with_capacity(contenders);
    let (mut waits, mut timeouts) = (Samples::default(), 0);
    while let Some(done) = bounded(tasks.join_next(), "S3", &target.store).await? {
        let (own, own_timeouts) = done??;
        grants.push(own.len() as f64);
        timeouts += own_timeouts;
        for wait in own {
            waits.push(wait);
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    let total = waits.len();
    Ok(HotLock {
        store: target.store.clone(),
        contenders,
        hold_ms,
        grants: total,
        seconds,
        per_second: total as f64 / seconds,
        jain: jain(&grants),
        p99_wait_us: waits.percentile(99.0),
        max_wait_us: waits.percentile(100.0),
        timeouts,
    })
}

/// Awaits one step of a scenario, failing after [`STEP_LIMIT`].
async fn bounded<T>(step: impl Future<Output = T>, scenario: &str, store: &str) -> Result<T> {
    tokio::time::timeout(STEP_LIMIT, step)
        .await
        .map_err(|_| format!("{scenario} on {store}: a step took over {STEP_LIMIT:?}").into())
}

// --- S5 ---------------------------------------------------------------------------

/// The argument that runs this binary as the holder of S5 (see [`hold_many`]).
pub(crate) const S5_CHILD: &str = "--s5-child";

/// S5: a child process holds the locks; the server's counters are read when it says
/// it holds them all and when its hold ends.
async fn s5(target: &Target, sizes: &Sizes) -> Result<HeldMany> {
    let locks = if target.session_locks {
        sizes.s5_locks.min(SESSION_LOCKS)
    } else {
        sizes.s5_locks
    };
    let mut child = tokio::process::Command::new(std::env::current_exe()?)
        .arg(S5_CHILD)
        .arg(&target.url)
        .arg(locks.to_string())
        .arg(sizes.s5_ttl.as_millis().to_string())
        .arg(sizes.s5_hold.as_millis().to_string())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let stdout = child
        .stdout
        .take()
        .ok_or("S5: the child's stdout is not piped")?;
    let mut lines = BufReader::new(stdout).lines();
    let mut next_line = async || -> Result<String> {
        let line = bounded(lines.next_line(), "S5", &target.store)
            .await??
            .ok_or_else(|| format!("S5 on {}: the holder exited early", target.store))?;
        match line.strip_prefix("error ") {
            Some(err) => Err(format!("S5 on {}: {err}", target.store).into()),
            None => Ok(line),
        }
    };
    let held = next_line().await?;
    if held != "held" {
        return Err(format!("S5 on {}: unexpected `{held}`", target.store).into());
    }
    let before = count(&target.counter).await?;
    let hold_started = Instant::now();
    let done = next_line().await?;
    let held_for = hold_started.elapsed();
    let after = count(&target.counter).await?;
    let fields: BTreeMap<&str, f64> = done
        .strip_prefix("done ")
        .ok_or_else(|| format!("S5 on {}: unexpected `{done}`", target.store))?
        .split(' ')
        .filter_map(|pair| {
            let (key, value) = pair.split_once('=')?;
            Some((key, value.parse().ok()?))
        })
        .collect();
    let field = |key: &str| {
        fields
            .get(key)
            .copied()
            .ok_or_else(|| format!("S5 on {}: no `{key}` in `{done}`", target.store))
    };
    let (bytes_per_lock, lost) = (field("bytes_per_lock")?, field("lost")? as usize);
    bounded(child.wait(), "S5", &target.store).await??;
    let (renewals, counted) = match (before, after) {
        (Some((before, unit)), Some((after, _))) => (
            Some((after - before) as f64 / held_for.as_secs_f64()),
            unit.to_owned(),
        ),
        _ => (None, counter_unit(&target.counter).to_owned()),
    };
    Ok(HeldMany {
        store: target.store.clone(),
        locks,
        held_s: held_for.as_secs_f64(),
        ttl_s: sizes.s5_ttl.as_secs_f64(),
        renewals_per_second: renewals,
        counted,
        bytes_per_lock,
        lost,
    })
}

fn counter_unit(counter: &Counter) -> &'static str {
    match counter {
        Counter::Redis(_) => "commands (total_commands_processed, all nodes)",
        Counter::Etcd(_) => {
            "lease renewals seen by the leader (etcd_debugging_lease_renewed_total)"
        }
        Counter::ZooKeeper(_) => "packets received (zk_packets_received: pings and requests)",
        Counter::Postgres(_) => "statements (pg_stat_statements calls)",
        Counter::MariaDb(_) => "statements (Questions)",
        Counter::None(why) => why,
    }
}

/// The server's counter of requests, with what it counts; `None` where it has none.
/// Each read's own request is left out where the server counts it.
async fn count(counter: &Counter) -> Result<Option<(i64, &'static str)>> {
    let unit = counter_unit(counter);
    let value = match counter {
        Counter::Redis(urls) => {
            let mut total = 0;
            for url in urls {
                let mut conn = redis::Client::open(url.as_str())?
                    .get_multiplexed_async_connection()
                    .await?;
                let info: String = redis::cmd("INFO")
                    .arg("stats")
                    .query_async(&mut conn)
                    .await?;
                let processed = info
                    .lines()
                    .find_map(|line| line.strip_prefix("total_commands_processed:"))
                    .and_then(|count| count.trim().parse::<i64>().ok())
                    .ok_or("INFO stats has no total_commands_processed")?;
                // This INFO (and the HELLO/CLIENT commands of a new connection) are
                // counted alike at both reads.
                total += processed;
            }
            total
        }
        Counter::Etcd(addr) => etcd_keepalives(*addr).await?,
        Counter::ZooKeeper(zk) => zk
            .metrics()
            .await
            .and_then(|metrics| metrics.get("zk_packets_received").copied())
            .ok_or("ZooKeeper's mntr has no zk_packets_received")?,
        Counter::Postgres(admin) => crate::sql::pg_statements(admin).await?,
        Counter::MariaDb(url) => {
            use sqlx::Row;
            let pool = sqlx::mysql::MySqlPoolOptions::new()
                .max_connections(1)
                .connect(url)
                .await?;
            let row = sqlx::raw_sql("SHOW GLOBAL STATUS LIKE 'Questions'")
                .fetch_one(&pool)
                .await?;
            let value: String = row.try_get(1)?;
            pool.close().await;
            value.parse()?
        }
        Counter::None(_) => return Ok(None),
    };
    Ok(Some((value, unit)))
}

/// The lease renewals etcd's leader saw, from its `/metrics` page (plain HTTP on the
/// client port).
async fn etcd_keepalives(addr: std::net::SocketAddr) -> Result<i64> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    stream
        .write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .await?;
    let mut page = String::new();
    bounded(stream.read_to_string(&mut page), "S5", "etcd").await??;
    page.lines()
        .find_map(|line| line.strip_prefix("etcd_debugging_lease_renewed_total "))
        .and_then(|value| value.trim().parse::<f64>().ok())
        .map(|value| value as i64)
        .ok_or_else(|| "etcd's /metrics has no etcd_debugging_lease_renewed_total".into())
}

/// The child side of S5 (`fencelock-bench --s5-child URL LOCKS TTL_MS HOLD_MS`):
/// takes `LOCKS` locks through one `Locker`, prints `held`, holds them for `HOLD_MS`
/// (the watchdog renewing them), prints `done bytes_per_lock=B lost=N`, releases them
/// and exits. Resident memory is read from `/proc/self/statm` before and after taking
/// the locks.
pub(crate) async fn hold_many(args: &[String]) -> Result<()> {
    let [url, locks, ttl_ms, hold_ms] = args else {
        return Err(format!("usage: fencelock-bench {S5_CHILD} URL LOCKS TTL_MS HOLD_MS").into());
    };
    let locks: usize = locks.parse()?;
    let ttl = Duration::from_millis(ttl_ms.parse()?);
    let hold = Duration::from_millis(hold_ms.parse()?);
    let locker = fencelock::connect(url).await?;
    // One lock first, so connections and lazily built state exist before the baseline.
    locker
        .lock("bench-s5-warm")
        .ttl(ttl)
        .no_wait()
        .await?
        .release()
        .await?;
    let baseline = resident_bytes()?;
    let takers = 16.min(locks.max(1));
    let mut tasks = JoinSet::new();
    for taker in 0..takers {
        let locker = locker.clone();
        tasks.spawn(async move {
            let mut guards = Vec::new();
            for index in (taker..locks).step_by(takers) {
                guards.push(
                    locker
                        .lock(format!("bench-s5-{index}"))
                        .ttl(ttl)
                        .no_wait()
                        .await?,
                );
            }
            Ok::<_, Error>(guards)
        });
    }
    let mut guards = Vec::with_capacity(locks);
    while let Some(done) = bounded(tasks.join_next(), "S5", url).await? {
        guards.extend(done??);
    }
    let held_bytes = resident_bytes()?;
    println!("held");
    tokio::time::sleep(hold).await;
    let lost = guards.iter().filter(|guard| !guard.is_held()).count();
    let per_lock = (held_bytes.saturating_sub(baseline)) as f64 / locks.max(1) as f64;
    println!("done bytes_per_lock={per_lock:.1} lost={lost}");
    for guard in guards {
        // A lost lock reports it here; it was counted above.
        let _ = guard.release().await;
    }
    Ok(())
}

fn resident_bytes() -> Result<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm")?;
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .ok_or("/proc/self/statm has no resident field")?
        .parse()?;
    let page = nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)?
        .ok_or("the system reports no page size")?;
    Ok(pages * u64::try_from(page)?)
}

// --- S7 ---------------------------------------------------------------------------

/// S7: a worker process takes the lock, a client here waits for it, the worker is
/// killed; the time from the kill to the grant.
async fn s7(target: &Target, sizes: &Sizes) -> Result<Takeover> {
    let ttl = sizes.s7_ttl;
    let ttl_text = format!("{}ms", ttl.as_millis());
    let url = match target.session_options {
        Some(option) => {
            let separator = if target.url.contains('?') { '&' } else { '?' };
            format!("{}{separator}{option}={ttl_text}", target.url)
        }
        None => target.url.clone(),
    };
    let bound = match target.session_options {
        Some(option) => format!("{option} {}", format_duration(ttl)),
        None if target.session_locks => {
            format!("the holder's connection (TTL {})", format_duration(ttl))
        }
        None => format!("lease TTL {}", format_duration(ttl)),
    };
    let program = worker_program()?;
    let dir = tempfile::tempdir()?;
    let resource = dir.path().join("resource.db");
    let waiter = fencelock::connect(&url).await?;
    let mut samples = Samples::default();
    for run in 0..sizes.s7_runs {
        let name = format!("bench-s7-{run}");
        let mut holder = Worker::spawn(&program, "holder", &url, &resource).await?;
        match holder.acquire(&name, ttl, Duration::ZERO).await? {
            Acquired::Granted(_) => {}
            other => {
                return Err(format!(
                    "S7 on {}: the worker was not granted: {other:?}",
                    target.store
                )
                .into());
            }
        }
        let next = waiter.clone();
        let waiting = tokio::spawn(async move {
            let guard = next.lock(&name).ttl(ttl).wait(STEP_LIMIT).await?;
            let granted = Instant::now();
            guard.release().await?;
            Ok::<_, Error>(granted)
        });
        // Let the waiter start waiting before the holder dies.
        tokio::time::sleep(Duration::from_millis(50)).await;
        if waiting.is_finished() {
            return Err(format!(
                "S7 on {}: the waiter was granted while the worker held the lock",
                target.store
            )
            .into());
        }
        let killed = Instant::now();
        holder.kill().await?;
        let granted = bounded(waiting, "S7", &target.store).await???;
        samples.push(granted.saturating_duration_since(killed));
    }
    Ok(Takeover {
        store: target.store.clone(),
        runs: samples.len(),
        p50_ms: samples.percentile(50.0) / 1000.0,
        max_ms: samples.percentile(100.0) / 1000.0,
        bound,
        bound_ms: ttl.as_secs_f64() * 1000.0,
    })
}

fn format_duration(duration: Duration) -> String {
    format!("{} s", duration.as_secs_f64())
}

/// The conformance worker built beside this binary (`fencelock-bench-worker`), or
/// the one `FENCELOCK_BENCH_WORKER` names.
fn worker_program() -> Result<PathBuf> {
    if let Some(path) = std::env::var_os("FENCELOCK_BENCH_WORKER") {
        return Ok(path.into());
    }
    let exe = std::env::current_exe()?;
    let program = exe.with_file_name("fencelock-bench-worker");
    if program.exists() {
        Ok(program)
    } else {
        Err(format!(
            "S7 needs the worker binary {} (build it with `cargo build --release -p \
             fencelock-bench`, which builds both binaries), or set FENCELOCK_BENCH_WORKER",
            program.display()
        )
        .into())
    }
}
