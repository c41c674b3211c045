//! Running the workers and following them: in this process for one, as child processes of this
//! same binary for several (a process here may hold at most 20,000 open files). A child gets its
//! plan as the first line of its stdin and controls (`start`, `stop`; EOF = stop) on the next
//! ones, and reports progress and its result as JSON lines on its stdout.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::sync::mpsc;
use tokio::time::{sleep_until, Instant};

use crate::cli::WorkerArgs;
use crate::plan::{Control, Event, Plan, Progress, Shard, ShardResult};
use crate::progress::Display;
use crate::worker;

/// Raises the soft limit of open files to the hard limit; returns the new soft limit.
pub fn raise_nofile_limit() -> u64 {
    // SAFETY: getrlimit/setrlimit only read and write the struct they are given.
    unsafe {
        let mut lim: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 1024;
        }
        if lim.rlim_cur < lim.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                return raised.rlim_cur;
            }
        }
        lim.rlim_cur
    }
}

pub fn nofile_limit() -> u64 {
    // SAFETY: as above.
    unsafe {
        let mut lim: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 1024;
        }
        lim.rlim_cur
    }
}

/// What the coordinator knows of its workers.
pub struct Live {
    pub progress: Vec<Progress>,
    pub ready: Vec<bool>,
    pub done: Vec<Option<ShardResult>>,
    pub failed: Vec<Option<String>>,
    pub display: Display,
}

impl Live {
    fn apply(&mut self, i: usize, ev: Event) {
        match ev {
            Event::Progress(p) => self.progress[i] = p,
            Event::Ready(p) => {
                self.progress[i] = p;
                self.ready[i] = true;
            }
            Event::Done(r) => self.done[i] = Some(*r),
            Event::Failed(e) => self.failed[i] = Some(e),
        }
    }

    fn finished(&self, i: usize) -> bool {
        self.done[i].is_some() || self.failed[i].is_some()
    }

    pub fn all_ready(&self) -> bool {
        (0..self.ready.len()).all(|i| self.ready[i] || self.finished(i))
    }

    pub fn all_done(&self) -> bool {
        (0..self.ready.len()).all(|i| self.finished(i))
    }

    pub fn total(&self) -> Progress {
        let mut t = Progress::default();
        for p in &self.progress {
            t.add(p);
        }
        t
    }
}

/// Takes events until `cond` holds (true) or `until` passes (false).
pub async fn pump(
    events: &mut mpsc::UnboundedReceiver<(usize, Event)>,
    live: &mut Live,
    until: Instant,
    cond: impl Fn(&Live) -> bool,
) -> bool {
    loop {
        if cond(live) {
            let t = live.total();
            live.display.update(&t, true);
            return true;
        }
        tokio::select! {
            ev = events.recv() => match ev {
                Some((i, ev)) => live.apply(i, ev),
                None => return cond(live),
            },
            _ = sleep_until(until) => return cond(live),
        }
        let t = live.total();
        live.display.update(&t, false);
    }
}

/// Starts the workers: in this process for one, as child processes otherwise.
pub fn start_workers(
    plan: &Arc<Plan>,
    procs: usize,
    exe: Option<&Path>,
    events: &mpsc::UnboundedSender<(usize, Event)>,
) -> anyhow::Result<Vec<mpsc::UnboundedSender<Control>>> {
    let mut controls = Vec::new();
    for index in 0..procs {
        let shard = Shard {
            index,
            count: procs,
        };
        let (ctl_tx, mut ctl_rx) = mpsc::unbounded_channel::<Control>();
        controls.push(ctl_tx);
        let events = events.clone();
        if procs == 1 {
            let plan = plan.clone();
            tokio::spawn(async move {
                let result = worker::run(plan, shard, ctl_rx, events.clone()).await;
                let _ = events.send((index, Event::Done(Box::new(result))));
            });
            continue;
        }
        let exe = match exe {
            Some(e) => e.to_owned(),
            None => std::env::current_exe().context("cannot find this program to start workers")?,
        };
        let mut child = tokio::process::Command::new(&exe)
            .arg("__worker")
            .arg("--shard")
            .arg(index.to_string())
            .arg("--shards")
            .arg(procs.to_string())
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot start worker {}", exe.display()))?;
        let mut stdin = child.stdin.take().expect("piped stdin");
        let stdout = child.stdout.take().expect("piped stdout");
        let mut plan_line = serde_json::to_vec(&**plan)?;
        plan_line.push(b'\n');
        tokio::spawn(async move {
            if stdin.write_all(&plan_line).await.is_err() {
                return;
            }
            let _ = stdin.flush().await;
            while let Some(c) = ctl_rx.recv().await {
                let mut line = serde_json::to_vec(&c).expect("controls serialise");
                line.push(b'\n');
                if stdin.write_all(&line).await.is_err() || stdin.flush().await.is_err() {
                    return;
                }
            }
            // Dropping stdin tells the worker to stop.
        });
        tokio::spawn(async move {
            let mut lines = BufReader::new(stdout).lines();
            let mut done = false;
            while let Ok(Some(line)) = lines.next_line().await {
                match serde_json::from_str::<Event>(&line) {
                    Ok(ev) => {
                        done |= matches!(ev, Event::Done(_));
                        let _ = events.send((index, ev));
                    }
                    Err(_) => eprintln!("worker {index}: {line}"),
                }
            }
            let status = tokio::time::timeout(Duration::from_secs(15), child.wait()).await;
            if !done {
                let _ = events.send((
                    index,
                    Event::Failed(format!(
                        "worker process {index} ended without a result: {status:?}"
                    )),
                ));
            }
            // `child` is dropped here; kill_on_drop ends it if it still runs.
        });
    }
    Ok(controls)
}

/// A worker process: plan on the first stdin line, controls on the next ones (EOF = stop), events
/// as JSON lines on stdout.
pub async fn child(args: WorkerArgs) -> anyhow::Result<()> {
    raise_nofile_limit();
    let mut input = BufReader::new(tokio::io::stdin()).lines();
    let line = input
        .next_line()
        .await?
        .context("the worker's plan must come on stdin")?;
    let plan: Plan = serde_json::from_str(&line).context("bad plan")?;
    let (ctl_tx, ctl_rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok(Some(line)) = input.next_line().await {
            if let Ok(c) = serde_json::from_str::<Control>(&line) {
                let _ = ctl_tx.send(c);
            }
        }
    });
    let (ev_tx, mut ev_rx) = mpsc::unbounded_channel::<(usize, Event)>();
    let writer = tokio::spawn(async move {
        let mut out = tokio::io::stdout();
        while let Some((_, ev)) = ev_rx.recv().await {
            let mut line = serde_json::to_vec(&ev).expect("events serialise");
            line.push(b'\n');
            if out.write_all(&line).await.is_err() || out.flush().await.is_err() {
                return;
            }
        }
    });
    let shard = Shard {
        index: args.shard,
        count: args.shards,
    };
    let result = worker::run(Arc::new(plan), shard, ctl_rx, ev_tx.clone()).await;
    let _ = ev_tx.send((args.shard, Event::Done(Box::new(result))));
    drop(ev_tx);
    let _ = writer.await;
    // A blocked read of stdin would keep the runtime from shutting down.
    std::process::exit(0);
}
