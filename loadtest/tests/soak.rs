//! The soak scenario, short: two gateway nodes (the `imgate` binary of this build, as child
//! processes) on a Redis and a database of the test's own, under steady traffic while every kind
//! of fault is injected once; nothing stored may be lost, doubled or reordered.

use clap::Parser;
use imgate_loadtest::cli::{Cli, Command};
use imgate_loadtest::soak::faults::FaultKind;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_soak_with_every_fault_loses_nothing() {
    let mysql =
        std::env::var("TEST_MYSQL_URL").unwrap_or_else(|_| "mysql://root@127.0.0.1:3306".into());
    let cli = Cli::parse_from([
        "imgate-loadtest",
        "soak",
        "--nodes",
        "2",
        "--users",
        "8",
        "--rate",
        "40",
        // Long enough for the deck of 8 kinds: each waits ~1 s, then lasts up to 5 s.
        "--duration",
        "45",
        "--fault-every",
        "1",
        "--drain",
        "60",
        "--quiet",
        "--mysql",
        &mysql,
    ]);
    let Command::Soak(args) = cli.command else {
        unreachable!("parsed as soak")
    };
    let report = imgate_loadtest::soak::run(&args)
        .await
        .expect("the soak runs");
    let md = report.markdown();
    assert!(report.passed, "{md}");
    for kind in FaultKind::all() {
        assert!(
            report.faults.counts.get(&kind.name()).copied().unwrap_or(0) >= 1,
            "{} never injected\n{md}",
            kind.name()
        );
    }
    let v = &report.verdict;
    assert!(
        v.promised > 300,
        "too little got through to mean anything\n{md}"
    );
    assert_eq!((v.lost, v.duplicates, v.out_of_order), (0, 0, 0), "{md}");
    assert_eq!(v.received, v.promised + v.received_unanswered, "{md}");
}
