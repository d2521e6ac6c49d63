//! The store test suite, run against both backends: a real SQLite file
//! and a real PostgreSQL database (the test process's throwaway cluster,
//! [`crate::testing`]). Each test is written once, generic over
//! [`Backend`], and instantiated per backend by `suite!` in `mod sqlite`
//! and `mod postgres`; tests of PostgreSQL alone (fencing) follow.

use super::*;
use drover_core::RolloutState;

/// A kind of database the suite runs on.
/// Every node's heartbeat, by name.
async fn last_seen(s: &impl Store) -> Vec<u64> {
    s.list_nodes()
        .await
        .unwrap()
        .iter()
        .map(|n| n.last_seen)
        .collect()
}

trait Backend {
    type S: Store;
    /// Keeps the database alive (and names it, to reopen it).
    type Guard;
    /// A store on a new, empty database.
    async fn open() -> (Self::Guard, Self::S);
    /// Another store on the same database, as a restarted server opens it.
    async fn reopen(g: &Self::Guard) -> Self::S;
}

struct Sqlite;

impl Backend for Sqlite {
    type S = SqliteStore;
    type Guard = tempfile::TempDir;

    async fn open() -> (tempfile::TempDir, SqliteStore) {
        let dir = tempfile::tempdir().unwrap();
        let s = Self::reopen(&dir).await;
        (dir, s)
    }

    async fn reopen(dir: &tempfile::TempDir) -> SqliteStore {
        SqliteStore::open(&dir.path().join("drover.db"))
            .await
            .unwrap()
    }
}

struct Postgres;

impl Backend for Postgres {
    type S = PgStore;
    /// The database's URL.
    type Guard = String;

    async fn open() -> (String, PgStore) {
        let url = testing::shared().fresh_database().await;
        let s = Self::reopen(&url).await;
        (url, s)
    }

    /// Connects and takes the lead (the leader's writes are fenced).
    async fn reopen(url: &String) -> PgStore {
        let s = PgStore::connect(url).await.unwrap();
        s.lead_for_tests().await.unwrap();
        s
    }
}

/// Instantiates every test of the suite for one backend.
macro_rules! suite {
    ($backend:ty) => {
        suite!(@tests $backend;
            apps_are_unique_and_survive_reopening,
            releases_are_numbered_per_app_and_live_release_remembers_the_previous,
            each_environment_has_its_own_live_release_and_rollouts,
            rollout_progress_is_persisted_at_every_update,
            instance_changes_bump_the_index_once_per_transaction,
            nodes_must_register_before_heartbeats,
            events_are_listed_newest_first,
            bump_index_moves_the_index_forward,
            a_webhook_delivery_and_an_automatic_commit_make_one_run_each,
            runs_left_running_by_a_dead_server_are_marked_failed,
            observations_from_an_unregistered_node_are_refused,
            observations_of_a_batch_land_and_unknown_nodes_fail_alone,
            tokens_are_stored_by_id_listed_and_revoked_once,
            node_certificates_are_revoked_per_node_and_pruned_once_expired,
            completing_a_rollout_makes_its_target_live_in_the_same_write,
            a_release_keeps_the_secrets_of_when_it_was_made,
            deliveries_come_due_in_order_survive_reopening_and_ended_ones_are_pruned,
        );
        #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
        async fn concurrent_writers_wait_for_each_other_instead_of_failing_busy() {
            super::concurrent_writers_wait_for_each_other_instead_of_failing_busy::<$backend>()
                .await
        }
    };
    (@tests $backend:ty; $($name:ident),* $(,)?) => {
        $(
            #[tokio::test]
            async fn $name() {
                super::$name::<$backend>().await
            }
        )*
    };
}

mod sqlite {
    suite!(super::Sqlite);
}

mod postgres {
    use super::*;

    suite!(super::Postgres);

    /// What an election's winner does: bumps the epoch, naming itself, and
    /// leads at the new one.
    async fn take_over(s: &PgStore, holder: &str) -> u64 {
        let e: i64 = sqlx::query_scalar(
            "UPDATE leader SET epoch = epoch + 1, holder = $1 WHERE id = 1 RETURNING epoch",
        )
        .bind(holder)
        .fetch_one(s.pool())
        .await
        .unwrap();
        s.set_epoch(e as u64);
        e as u64
    }

    fn instance(id: &str) -> InstanceRecord {
        InstanceRecord {
            id: id.into(),
            app: "a".into(),
            env: String::new(),
            release: "r1".into(),
            node: "n1".into(),
            desired: Desired::Run,
            drain_index: None,
            routed: true,
            created_at: 1,
            observed: None,
            observed_at: None,
        }
    }

    fn release(commit: &str) -> NewRelease<'_> {
        NewRelease {
            app: "a",
            commit,
            sha256: "d",
            size: 1,
            image: None,
            image_ref: None,
            spec: "{}",
        }
    }

    /// Whether the pool's connection speaks TLS, as the server sees it.
    async fn over_tls(s: &PgStore) -> bool {
        sqlx::query_scalar("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
            .fetch_one(s.pool())
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn connections_use_tls_and_verify_the_server_against_the_given_ca() {
        let pg = testing::shared();
        let url = pg.fresh_database().await;
        // verify-full: TLS, the certificate checked against the CA and
        // the host name (127.0.0.1) against the certificate.
        let verified = format!(
            "{url}?sslmode=verify-full&sslrootcert={}",
            pg.ca_file().display()
        );
        let s = PgStore::connect(&verified).await.unwrap();
        assert!(over_tls(&s).await);
        s.insert_app(&app("a")).await.unwrap();
        // The default, `prefer`, takes TLS when the server offers it;
        // `disable` does not.
        assert!(over_tls(&PgStore::connect(&url).await.unwrap()).await);
        let plain = PgStore::connect(&format!("{url}?sslmode=disable"))
            .await
            .unwrap();
        assert!(!over_tls(&plain).await);
        // A CA that did not sign the server's certificate: refused, with
        // the cause, and the password not in the message.
        let other = tempfile::tempdir().unwrap();
        let ca = other.path().join("other-ca.pem");
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::default();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
        std::fs::write(&ca, params.self_signed(&key).unwrap().pem()).unwrap();
        let wrong = format!(
            "postgres://postgres:hunter2@127.0.0.1:{}/{}?sslmode=verify-full&sslrootcert={}",
            pg.port(),
            url.rsplit('/').next().unwrap(),
            ca.display()
        );
        let err = PgStore::connect_within(&wrong, std::time::Duration::from_secs(3))
            .await
            .err()
            .expect("a server certificate from another CA is refused")
            .to_string();
        assert!(
            err.contains("cannot connect to PostgreSQL at postgres://postgres:***@")
                && err.to_lowercase().contains("certificate")
                && !err.contains("hunter2"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn a_deposed_leader_cannot_write_what_only_the_leader_writes() {
        let url = testing::shared().fresh_database().await;
        let a = PgStore::connect(&url).await.unwrap();
        assert_eq!(take_over(&a, "a").await, 1);
        a.insert_app(&app("a")).await.unwrap();
        let index = a.index().await.unwrap();

        // B wins an election while A still believes it leads.
        let b = PgStore::connect(&url).await.unwrap();
        assert_eq!(take_over(&b, "b").await, 2);
        assert_eq!(a.epoch(), 1);
        assert_eq!(
            a.current_leader().await.unwrap(),
            (2, "b".to_string(), String::new())
        );

        let fenced = |r: Result<_>| {
            matches!(
                r,
                Err(StoreError::Fenced {
                    mine: 1,
                    current: 2
                })
            )
        };
        assert!(fenced(
            a.apply_instance_changes(&[InstanceChange::Insert(instance("i1"))])
                .await
                .map(drop)
        ));
        assert!(fenced(a.create_rollout(&rollout(), 1).await.map(drop)));
        assert!(fenced(a.bump_index().await.map(drop)));
        assert!(fenced(a.create_release(release("c1"), 1).await.map(drop)));
        assert!(fenced(a.ensure_deployment("a", "staging").await));
        let err = a.bump_index().await.unwrap_err().to_string();
        assert!(err.contains("no longer the leader"), "{err}");

        // Nothing A tried is visible.
        assert!(b.list_instances("a").await.unwrap().is_empty());
        assert_eq!(b.index().await.unwrap(), index);
        assert_eq!(b.latest_rollout("a", "").await.unwrap(), None);
        assert!(b.list_releases("a").await.unwrap().is_empty());
        assert_eq!(b.get_deployment("a", "staging").await.unwrap(), None);

        // The new leader writes.
        assert_eq!(
            b.apply_instance_changes(&[InstanceChange::Insert(instance("i1"))])
                .await
                .unwrap(),
            index + 1
        );
        b.create_rollout(&rollout(), 1).await.unwrap();
        assert_eq!(b.bump_index().await.unwrap(), index + 2);
        assert_eq!(b.list_instances("a").await.unwrap().len(), 1);

        // Writes that are not the leader's still go through from A.
        a.register_node("n1", &BTreeMap::new(), None, 1)
            .await
            .unwrap();
        a.add_event(Some("a"), "test", "from a", 1).await.unwrap();
        assert_eq!(b.list_nodes().await.unwrap().len(), 1);
        assert_eq!(b.list_events(Some("a"), 10).await.unwrap().len(), 1);
    }

    #[tokio::test]
    async fn a_server_that_never_led_cannot_write_what_only_the_leader_writes() {
        let url = testing::shared().fresh_database().await;
        let s = PgStore::connect(&url).await.unwrap();
        assert_eq!(s.url_redacted(), url, "no password to hide");
        assert_eq!(s.epoch(), 0);
        s.insert_app(&app("a")).await.unwrap();
        assert!(matches!(
            s.create_run(&run("a", "c1", "poll", None)).await,
            Err(StoreError::Fenced {
                mine: 0,
                current: 0
            })
        ));
        // Nor once another leads.
        let leader = PgStore::connect(&url).await.unwrap();
        leader.lead_for_tests().await.unwrap();
        assert!(matches!(
            s.create_run(&run("a", "c1", "poll", None)).await,
            Err(StoreError::Fenced {
                mine: 0,
                current: 1
            })
        ));
        assert!(s.list_runs("a", 10).await.unwrap().is_empty());
        leader
            .create_run(&run("a", "c1", "poll", None))
            .await
            .unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_releases_from_two_stores_get_distinct_consecutive_numbers() {
        let url = testing::shared().fresh_database().await;
        let a = PgStore::connect(&url).await.unwrap();
        let epoch = a.lead_for_tests().await.unwrap();
        // Another pool of the same leader: truly concurrent transactions.
        let b = PgStore::connect(&url).await.unwrap();
        b.set_epoch(epoch);
        a.insert_app(&app("a")).await.unwrap();
        let mut tasks = Vec::new();
        for t in 0..8 {
            let s = if t % 2 == 0 { a.clone() } else { b.clone() };
            tasks.push(tokio::spawn(async move {
                let mut got = Vec::new();
                for i in 0..10 {
                    got.push(
                        s.create_release(release(&format!("c{t}-{i}")), 1)
                            .await?
                            .number,
                    );
                }
                Ok::<_, StoreError>(got)
            }));
        }
        let mut numbers = Vec::new();
        for t in tasks {
            numbers.extend(t.await.unwrap().unwrap());
        }
        numbers.sort();
        assert_eq!(numbers, (1..=80).collect::<Vec<i64>>());
        let stored: Vec<i64> = a
            .list_releases("a")
            .await
            .unwrap()
            .iter()
            .map(|r| r.number)
            .collect();
        assert_eq!(stored, (1..=80).rev().collect::<Vec<i64>>());
    }
}

fn app(name: &str) -> AppRecord {
    AppRecord {
        name: name.into(),
        repo: "/r".into(),
        branch: "main".into(),
        spec: "{}".into(),
        created_at: 1,
        polled_commit: None,
        webhook_secret: None,
    }
}

/// Makes `release` live in (app, env) the way the engine does: a rollout
/// that succeeds.
async fn make_live(s: &dyn Store, app: &str, env: &str, release: &str) {
    let mut r = s
        .create_rollout(&Rollout::new(app, env, None, release, 1), 1)
        .await
        .unwrap();
    r.state = RolloutState::Succeeded;
    s.complete_rollout(&r, 2).await.unwrap();
}

fn rollout() -> Rollout {
    Rollout::new("a", "", None, "r1", 1)
}

async fn apps_are_unique_and_survive_reopening<B: Backend>() {
    let (g, s) = B::open().await;
    s.insert_app(&app("a")).await.unwrap();
    assert!(matches!(
        s.insert_app(&app("a")).await,
        Err(StoreError::Conflict(_))
    ));
    drop(s);
    let s = B::reopen(&g).await;
    assert_eq!(s.get_app("a").await.unwrap().name, "a");
    assert!(matches!(s.get_app("b").await, Err(StoreError::NotFound(_))));
}

async fn releases_are_numbered_per_app_and_live_release_remembers_the_previous<B: Backend>() {
    let (_g, s) = B::open().await;
    s.insert_app(&app("a")).await.unwrap();
    let r1 = s
        .create_release(
            NewRelease {
                app: "a",
                commit: "c1",
                sha256: "d1",
                size: 10,
                image: None,
                image_ref: None,
                spec: "{}",
            },
            1,
        )
        .await
        .unwrap();
    let r2 = s
        .create_release(
            NewRelease {
                app: "a",
                commit: "c2",
                sha256: "d2",
                size: 10,
                image: Some("sha256:feed"),
                image_ref: Some("r:5000/a@sha256:beef"),
                spec: "{}",
            },
            2,
        )
        .await
        .unwrap();
    assert_eq!((r1.name(), r2.name()), ("r1".to_string(), "r2".to_string()));
    make_live(&s, "a", "", "r1").await;
    make_live(&s, "a", "", "r2").await;
    let d = s.get_deployment("a", "").await.unwrap().unwrap();
    assert_eq!(
        (d.live_release.as_deref(), d.prev_release.as_deref()),
        (Some("r2"), Some("r1"))
    );
    assert_eq!(s.list_releases("a").await.unwrap().len(), 2);
    // A container image release keeps its image id; a process release has none.
    assert_eq!(s.get_release("a", 1).await.unwrap().image, None);
    assert_eq!(
        s.get_release("a", 2).await.unwrap().image.as_deref(),
        Some("sha256:feed")
    );
    assert_eq!(
        s.get_release("a", 2).await.unwrap().image_ref.as_deref(),
        Some("r:5000/a@sha256:beef")
    );
}

async fn each_environment_has_its_own_live_release_and_rollouts<B: Backend>() {
    let (_g, s) = B::open().await;
    s.insert_app(&app("a")).await.unwrap();
    s.ensure_deployment("a", "staging").await.unwrap();
    s.ensure_deployment("a", "staging").await.unwrap();
    assert_eq!(
        s.get_deployment("a", "staging")
            .await
            .unwrap()
            .unwrap()
            .live_release,
        None
    );
    make_live(&s, "a", "staging", "r2").await;
    make_live(&s, "a", "production", "r1").await;
    let all = s.list_deployments().await.unwrap();
    let live: Vec<_> = all
        .iter()
        .map(|d| (d.env.as_str(), d.live_release.as_deref()))
        .collect();
    assert_eq!(live, [("production", Some("r1")), ("staging", Some("r2"))]);
    assert!(s.get_deployment("a", "qa").await.unwrap().is_none());

    let mut staging = rollout();
    staging.env = "staging".into();
    let staging = s.create_rollout(&staging, 1).await.unwrap();
    let prod = s.create_rollout(&rollout(), 2).await.unwrap();
    assert_eq!(
        s.latest_rollout("a", "staging").await.unwrap(),
        Some(staging)
    );
    assert_eq!(s.latest_rollout("a", "").await.unwrap(), Some(prod));
    assert_eq!(s.latest_rollout("a", "qa").await.unwrap(), None);
}

async fn rollout_progress_is_persisted_at_every_update<B: Backend>() {
    let (_g, s) = B::open().await;
    s.insert_app(&app("a")).await.unwrap();
    let mut r = s.create_rollout(&rollout(), 1).await.unwrap();
    r.step = 2;
    r.state = RolloutState::Progressing;
    s.update_rollout(&r, 2).await.unwrap();
    assert_eq!(s.latest_rollout("a", "").await.unwrap(), Some(r));
}

async fn instance_changes_bump_the_index_once_per_transaction<B: Backend>() {
    let (_g, s) = B::open().await;
    s.insert_app(&app("a")).await.unwrap();
    let i0 = s.index().await.unwrap();
    let rec = InstanceRecord {
        id: "i1".into(),
        app: "a".into(),
        env: "staging".into(),
        release: "r1".into(),
        node: "n1".into(),
        desired: Desired::Run,
        drain_index: None,
        routed: false,
        created_at: 5,
        observed: None,
        observed_at: None,
    };
    let i1 = s
        .apply_instance_changes(&[
            InstanceChange::Insert(rec),
            InstanceChange::SetRouted {
                id: "i1".into(),
                routed: true,
            },
        ])
        .await
        .unwrap();
    assert_eq!(i1, i0 + 1);
    let i2 = s
        .apply_instance_changes(&[InstanceChange::Drain {
            id: "i1".into(),
            since: 9,
        }])
        .await
        .unwrap();
    let got = s.list_instances("a").await.unwrap();
    assert_eq!(got[0].desired, Desired::Drain { since: 9 });
    assert_eq!(got[0].drain_index, Some(i2));
    assert!(!got[0].routed);
    for n in ["n1", "n2"] {
        s.register_node(n, &BTreeMap::new(), None, 1).await.unwrap();
    }
    s.record_observations("n1", &[("i1".into(), "{\"x\":1}".into())], 10)
        .await
        .unwrap();
    assert_eq!(
        s.list_node_instances("n1").await.unwrap()[0]
            .observed
            .as_deref(),
        Some("{\"x\":1}")
    );
    // Another node cannot write observations for it.
    s.record_observations("n2", &[("i1".into(), "{}".into())], 11)
        .await
        .unwrap();
    assert_eq!(
        s.list_instances("a").await.unwrap()[0].observed_at,
        Some(10)
    );
    s.apply_instance_changes(&[InstanceChange::Delete { id: "i1".into() }])
        .await
        .unwrap();
    assert!(s.list_instances("a").await.unwrap().is_empty());
    assert_eq!(s.apply_instance_changes(&[]).await.unwrap(), i2 + 1);
}

async fn nodes_must_register_before_heartbeats<B: Backend>() {
    let (_g, s) = B::open().await;
    // A heartbeat: a report that observed nothing.
    let beat = |now| Observations {
        node: "n1".into(),
        observed: Vec::new(),
        now,
    };
    assert!(matches!(
        s.record_observations_batch(&[beat(1)]).await.unwrap()[..],
        [Err(StoreError::NotFound(_))]
    ));
    s.register_node(
        "n1",
        &BTreeMap::from([("role".into(), "web".into())]),
        None,
        1,
    )
    .await
    .unwrap();
    s.record_observations_batch(&[beat(5)]).await.unwrap()[0]
        .as_ref()
        .unwrap();
    let n = &s.list_nodes().await.unwrap()[0];
    assert_eq!((n.last_seen, n.labels["role"].as_str()), (5, "web"));
    assert_eq!(s.get_node("n1").await.unwrap().as_ref(), Some(n));
    assert_eq!(s.get_node("n9").await.unwrap(), None);
    // A starting server renews every lease, never moving one back.
    s.register_node("n2", &BTreeMap::new(), None, 50)
        .await
        .unwrap();
    s.renew_node_leases(20).await.unwrap();
    let seen = last_seen(&s).await;
    assert_eq!(seen, [20, 50]);
}

async fn events_are_listed_newest_first<B: Backend>() {
    let (_g, s) = B::open().await;
    s.add_event(Some("a"), "deploy", "one", 1).await.unwrap();
    s.add_event(Some("a"), "deploy", "two", 2).await.unwrap();
    let ev = s.list_events(Some("a"), 10).await.unwrap();
    assert_eq!(
        ev.iter().map(|e| e.message.as_str()).collect::<Vec<_>>(),
        ["two", "one"]
    );
}

async fn bump_index_moves_the_index_forward<B: Backend>() {
    let (_g, s) = B::open().await;
    let a = s.index().await.unwrap();
    assert_eq!(s.bump_index().await.unwrap(), a + 1);
    assert_eq!(s.index().await.unwrap(), a + 1);
}

fn run(app: &str, commit: &str, trigger: &str, delivery: Option<&str>) -> RunRecord {
    RunRecord {
        id: 0,
        app: app.into(),
        commit: commit.into(),
        git_ref: "main".into(),
        trigger: trigger.into(),
        delivery: delivery.map(Into::into),
        state: "queued".into(),
        steps: "[]".into(),
        release: None,
        rollout_id: None,
        error: None,
        created_at: 1,
        updated_at: 1,
    }
}

async fn a_webhook_delivery_and_an_automatic_commit_make_one_run_each<B: Backend>() {
    let (_g, s) = B::open().await;
    s.insert_app(&app("a")).await.unwrap();
    let r1 = s
        .create_run(&run("a", "c1", "webhook", Some("d1")))
        .await
        .unwrap();
    assert!(
        matches!(
            s.create_run(&run("a", "c2", "webhook", Some("d1"))).await,
            Err(StoreError::Conflict(_))
        ),
        "same delivery"
    );
    assert!(
        matches!(
            s.create_run(&run("a", "c1", "poll", None)).await,
            Err(StoreError::Conflict(_))
        ),
        "same commit, automatic"
    );
    // Manual runs of the same commit are allowed (a redeploy).
    s.create_run(&run("a", "c1", "manual", None)).await.unwrap();
    assert!(s.has_run_for_commit("a", "c1").await.unwrap());
    let mut r = s.get_run(r1.id).await.unwrap();
    r.state = "failed".into();
    r.error = Some("test failed".into());
    s.update_run(&r).await.unwrap();
    assert_eq!(
        s.list_runs("a", 10).await.unwrap().last().unwrap().state,
        "failed"
    );
}

async fn runs_left_running_by_a_dead_server_are_marked_failed<B: Backend>() {
    let (_g, s) = B::open().await;
    s.insert_app(&app("a")).await.unwrap();
    let r = s.create_run(&run("a", "c1", "poll", None)).await.unwrap();
    assert_eq!(s.fail_interrupted_runs(5).await.unwrap(), 1);
    let r = s.get_run(r.id).await.unwrap();
    assert_eq!(r.state, "failed");
    assert!(r.error.unwrap().contains("server restart"));
}

async fn observations_from_an_unregistered_node_are_refused<B: Backend>() {
    let (_g, s) = B::open().await;
    assert!(matches!(
        s.record_observations("ghost", &[], 1).await,
        Err(StoreError::NotFound(_))
    ));
}

async fn observations_of_a_batch_land_and_unknown_nodes_fail_alone<B: Backend>() {
    let (_g, s) = B::open().await;
    s.insert_app(&app("a")).await.unwrap();
    for n in ["n1", "n2"] {
        s.register_node(n, &BTreeMap::new(), None, 1).await.unwrap();
    }
    let inst = |id: &str, node: &str| {
        InstanceChange::Insert(InstanceRecord {
            id: id.into(),
            app: "a".into(),
            env: String::new(),
            release: "r1".into(),
            node: node.into(),
            desired: Desired::Run,
            drain_index: None,
            routed: false,
            created_at: 1,
            observed: None,
            observed_at: None,
        })
    };
    s.apply_instance_changes(&[inst("i2", "n2"), inst("i1", "n1")])
        .await
        .unwrap();
    let report = |node: &str, obs: &[(&str, &str)], now: u64| Observations {
        node: node.into(),
        observed: obs
            .iter()
            .map(|(id, json)| (id.to_string(), json.to_string()))
            .collect(),
        now,
    };
    let out = s
        .record_observations_batch(&[
            report("n2", &[("i2", "{\"n\":2}")], 5),
            report("ghost", &[("i1", "{}")], 5),
            report("n1", &[("i1", "{\"n\":1}")], 5),
            report("n1", &[("i1", "{\"n\":3}")], 6),
        ])
        .await
        .unwrap();
    assert!(matches!(
        out.iter().map(|r| r.is_ok()).collect::<Vec<_>>()[..],
        [true, false, true, true]
    ));
    assert!(matches!(out[1], Err(StoreError::NotFound(_))));
    let got: Vec<_> = s
        .list_instances("a")
        .await
        .unwrap()
        .into_iter()
        .map(|i| (i.id, i.observed, i.observed_at))
        .collect();
    assert_eq!(
        got,
        [
            ("i1".into(), Some("{\"n\":3}".into()), Some(6)),
            ("i2".into(), Some("{\"n\":2}".into()), Some(5)),
        ],
        "a later report on the same instance wins"
    );
    let seen = last_seen(&s).await;
    assert_eq!(seen, [6, 5]);
}

async fn concurrent_writers_wait_for_each_other_instead_of_failing_busy<B: Backend>() {
    let (_g, s) = B::open().await;
    let s = std::sync::Arc::new(s);
    s.insert_app(&app("a")).await.unwrap();
    let mut tasks = Vec::new();
    for t in 0..8 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..15 {
                // Read-then-write transactions, interleaved with plain writes.
                s.create_release(
                    NewRelease {
                        app: "a",
                        commit: &format!("c{t}-{i}"),
                        sha256: "d",
                        size: 1,
                        image: None,
                        image_ref: None,
                        spec: "{}",
                    },
                    1,
                )
                .await?;
                s.apply_instance_changes(&[InstanceChange::Insert(InstanceRecord {
                    id: format!("i{t}-{i}"),
                    app: "a".into(),
                    env: String::new(),
                    release: "r1".into(),
                    node: "n1".into(),
                    desired: Desired::Run,
                    drain_index: None,
                    routed: false,
                    created_at: 1,
                    observed: None,
                    observed_at: None,
                })])
                .await?;
                s.add_event(Some("a"), "test", "x", 1).await?;
            }
            Ok::<_, StoreError>(())
        }));
    }
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    let numbers: std::collections::BTreeSet<i64> = s
        .list_releases("a")
        .await
        .unwrap()
        .iter()
        .map(|r| r.number)
        .collect();
    assert_eq!(numbers, (1..=120).collect(), "every release numbered once");
    assert_eq!(s.list_instances("a").await.unwrap().len(), 120);
}

async fn tokens_are_stored_by_id_listed_and_revoked_once<B: Backend>() {
    let (_g, s) = B::open().await;
    let t = TokenRecord {
        id: "abc123".into(),
        name: "ci".into(),
        role: "deployer".into(),
        secret_hash: "00ff".into(),
        created_at: 5,
        expires_at: Some(100),
        revoked_at: None,
    };
    s.insert_token(&t).await.unwrap();
    assert!(matches!(
        s.insert_token(&t).await,
        Err(StoreError::Conflict(_))
    ));
    assert_eq!(s.get_token("abc123").await.unwrap(), t);
    assert!(matches!(
        s.get_token("nope").await,
        Err(StoreError::NotFound(_))
    ));
    s.revoke_token("abc123", 7).await.unwrap();
    s.revoke_token("abc123", 9).await.unwrap();
    assert_eq!(s.get_token("abc123").await.unwrap().revoked_at, Some(7));
    assert!(matches!(
        s.revoke_token("nope", 9).await,
        Err(StoreError::NotFound(_))
    ));
    assert_eq!(s.list_tokens().await.unwrap().len(), 1);
    // The hash never leaves in JSON.
    let json = serde_json::to_string(&t).unwrap();
    assert!(!json.contains("00ff"), "{json}");
}

async fn node_certificates_are_revoked_per_node_and_pruned_once_expired<B: Backend>() {
    let (_g, s) = B::open().await;
    let cert = |serial: &str, node: &str, issued_at: u64, not_after: u64| NodeCertRecord {
        serial: serial.into(),
        node: node.into(),
        issued_at,
        not_after,
        revoked_at: None,
    };
    let issue = |serial: &str, node: &str, issued_at: u64, not_after: u64| IssuedCert {
        record: cert(serial, node, issued_at, not_after),
        keep: None,
        prune_before: 0,
    };
    let none = BTreeMap::new();
    // Registering with a new certificate revokes the node's others: a
    // machine replaced under the same name.
    assert_eq!(
        s.register_node("a", &none, Some(&issue("01", "a", 1, 100)), 1)
            .await
            .unwrap(),
        0
    );
    // A renewal keeps the one in use.
    let renewal = IssuedCert {
        keep: Some("01"),
        ..issue("02", "a", 2, 200)
    };
    assert_eq!(
        s.register_node("a", &none, Some(&renewal), 2)
            .await
            .unwrap(),
        0
    );
    s.register_node("b", &none, Some(&issue("03", "b", 3, 300)), 3)
        .await
        .unwrap();
    // A serial issued twice is refused, and nothing of that registration
    // is written: neither revocations nor the node's new labels.
    let labelled = BTreeMap::from([("role".to_string(), "web".to_string())]);
    assert!(matches!(
        s.register_node("a", &labelled, Some(&issue("03", "a", 4, 300)), 4)
            .await,
        Err(StoreError::Conflict(_))
    ));
    assert_eq!(s.get_node("a").await.unwrap().unwrap().labels, none);
    assert_eq!(s.get_node_cert("01").await.unwrap().revoked_at, None);
    assert_eq!(
        s.get_node_cert("02").await.unwrap(),
        cert("02", "a", 2, 200)
    );
    assert!(matches!(
        s.get_node_cert("ff").await,
        Err(StoreError::NotFound(_))
    ));
    let serials = |v: Vec<NodeCertRecord>| v.into_iter().map(|c| c.serial).collect::<Vec<_>>();
    assert_eq!(serials(s.list_node_certs("a").await.unwrap()), ["02", "01"]);
    // Registering without a certificate revokes nothing.
    assert_eq!(s.register_node("a", &none, None, 40).await.unwrap(), 0);
    // A renewal keeping "02" revokes "01"; the new one stays valid.
    let renewal = IssuedCert {
        keep: Some("02"),
        ..issue("04", "a", 5, 250)
    };
    assert_eq!(
        s.register_node("a", &none, Some(&renewal), 50)
            .await
            .unwrap(),
        1
    );
    assert_eq!(s.get_node_cert("01").await.unwrap().revoked_at, Some(50));
    assert_eq!(s.get_node_cert("02").await.unwrap().revoked_at, None);
    assert_eq!(s.get_node_cert("04").await.unwrap().revoked_at, None);
    // A re-registration with the join token revokes all the others.
    assert_eq!(
        s.register_node("a", &none, Some(&issue("05", "a", 6, 400)), 60)
            .await
            .unwrap(),
        2
    );
    assert_eq!(s.get_node_cert("01").await.unwrap().revoked_at, Some(50));
    assert_eq!(s.get_node_cert("02").await.unwrap().revoked_at, Some(60));
    assert_eq!(s.get_node_cert("04").await.unwrap().revoked_at, Some(60));
    assert_eq!(s.get_node_cert("03").await.unwrap().revoked_at, None);
    assert_eq!(s.get_node("a").await.unwrap().unwrap().last_seen, 60);
    // Issuing one forgets those expired before the given time.
    let pruning = IssuedCert {
        prune_before: 150,
        ..issue("06", "a", 7, 500)
    };
    s.register_node("a", &none, Some(&pruning), 70)
        .await
        .unwrap();
    assert_eq!(
        serials(s.list_node_certs("a").await.unwrap()),
        ["06", "05", "04", "02"]
    );
}

async fn completing_a_rollout_makes_its_target_live_in_the_same_write<B: Backend>() {
    let (_g, s) = B::open().await;
    s.insert_app(&app("a")).await.unwrap();
    make_live(&s, "a", "", "r1").await;
    let mut r = s
        .create_rollout(&Rollout::new("a", "", Some("r1".into()), "r2", 1), 1)
        .await
        .unwrap();
    r.state = RolloutState::Succeeded;
    s.complete_rollout(&r, 2).await.unwrap();
    let d = s.get_deployment("a", "").await.unwrap().unwrap();
    assert_eq!(
        (d.live_release.as_deref(), d.prev_release.as_deref()),
        (Some("r2"), Some("r1"))
    );
    let latest = s.latest_rollout("a", "").await.unwrap().unwrap();
    assert_eq!(latest.state, RolloutState::Succeeded);
    // A rollout that is not stored changes nothing, live included.
    r.id += 100;
    r.to = "r3".into();
    assert!(matches!(
        s.complete_rollout(&r, 3).await,
        Err(StoreError::NotFound(_))
    ));
    let d = s.get_deployment("a", "").await.unwrap().unwrap();
    assert_eq!(d.live_release.as_deref(), Some("r2"));
}

async fn a_release_keeps_the_secrets_of_when_it_was_made<B: Backend>() {
    let (_g, s) = B::open().await;
    s.insert_app(&app("a")).await.unwrap();
    let put = |env: &str, name: &str, ct: &str, t: u64| SecretRecord {
        app: "a".into(),
        env: env.into(),
        name: name.into(),
        ciphertext: ct.into(),
        updated_at: t,
    };
    s.set_secret(&put("", "DB_URL", "sealed-1", 1))
        .await
        .unwrap();
    s.set_secret(&put("staging", "DB_URL", "sealed-s", 1))
        .await
        .unwrap();
    let r1 = s
        .create_release(
            NewRelease {
                app: "a",
                commit: "c1",
                sha256: "sha",
                size: 1,
                image: None,
                image_ref: None,
                spec: "{}",
            },
            2,
        )
        .await
        .unwrap();
    s.set_secret(&put("", "DB_URL", "sealed-2", 3))
        .await
        .unwrap();
    s.set_secret(&put("", "API_KEY", "sealed-k", 3))
        .await
        .unwrap();
    let r2 = s
        .create_release(
            NewRelease {
                app: "a",
                commit: "c2",
                sha256: "sha",
                size: 1,
                image: None,
                image_ref: None,
                spec: "{}",
            },
            4,
        )
        .await
        .unwrap();
    let names = |v: Vec<SecretRecord>| -> Vec<(String, String)> {
        v.into_iter().map(|r| (r.name, r.ciphertext)).collect()
    };
    assert_eq!(
        names(s.release_secrets("a", r1.number, "").await.unwrap()),
        [("DB_URL".to_string(), "sealed-1".to_string())]
    );
    assert_eq!(
        names(s.release_secrets("a", r2.number, "").await.unwrap()),
        [
            ("API_KEY".to_string(), "sealed-k".to_string()),
            ("DB_URL".to_string(), "sealed-2".to_string())
        ]
    );
    assert_eq!(
        names(s.release_secrets("a", r1.number, "staging").await.unwrap()),
        [("DB_URL".to_string(), "sealed-s".to_string())]
    );
    s.unset_secret("a", "", "API_KEY").await.unwrap();
    assert!(matches!(
        s.unset_secret("a", "", "API_KEY").await,
        Err(StoreError::NotFound(_))
    ));
    let now: Vec<_> = s
        .list_secrets("a")
        .await
        .unwrap()
        .into_iter()
        .map(|r| (r.env, r.name))
        .collect();
    assert_eq!(
        now,
        [
            ("".to_string(), "DB_URL".to_string()),
            ("staging".to_string(), "DB_URL".to_string())
        ]
    );
    // The release's copy is unchanged.
    assert_eq!(
        s.release_secrets("a", r2.number, "").await.unwrap().len(),
        2
    );
}

async fn deliveries_come_due_in_order_survive_reopening_and_ended_ones_are_pruned<B: Backend>() {
    let (g, s) = B::open().await;
    let d = |id: &str, at: u64| DeliveryRecord {
        id: id.into(),
        app: "web".into(),
        env: String::new(),
        event: "rollout.started".into(),
        url: "http://127.0.0.1:9/hook".into(),
        secret: "NOTIFY_KEY".into(),
        body: format!("{{\"id\":\"{id}\"}}"),
        state: "pending".into(),
        attempts: 0,
        next_at: at,
        last_status: None,
        last_error: None,
        created_at: at,
        updated_at: at,
    };
    s.add_deliveries(&[d("a", 10), d("b", 20)], 0)
        .await
        .unwrap();
    let due: Vec<String> = s
        .due_deliveries(15, 10)
        .await
        .unwrap()
        .into_iter()
        .map(|d| d.id)
        .collect();
    assert_eq!(due, ["a"], "b is not due yet");
    let mut a = s.due_deliveries(100, 10).await.unwrap().remove(0);
    assert_eq!(a.id, "a");
    a.state = "delivered".into();
    a.attempts = 2;
    a.last_status = Some(204);
    a.updated_at = 30;
    s.update_delivery(&a).await.unwrap();
    drop(s);
    let s = B::reopen(&g).await;
    let due: Vec<String> = s
        .due_deliveries(100, 10)
        .await
        .unwrap()
        .into_iter()
        .map(|d| d.id)
        .collect();
    assert_eq!(due, ["b"], "delivered ones are never due again");
    let all = s.list_deliveries("web", 10).await.unwrap();
    assert_eq!(all.len(), 2);
    assert_eq!((all[1].attempts, all[1].last_status), (2, Some(204)));
    // Adding later prunes the ended ones updated before the cut, not pending ones.
    s.add_deliveries(&[d("c", 50)], 40).await.unwrap();
    let ids: Vec<String> = s
        .list_deliveries("web", 10)
        .await
        .unwrap()
        .into_iter()
        .map(|d| d.id)
        .collect();
    assert_eq!(ids, ["c", "b"]);
    let mut gone = d("zz", 1);
    gone.state = "failed".into();
    assert!(matches!(
        s.update_delivery(&gone).await,
        Err(StoreError::NotFound(_))
    ));
}
