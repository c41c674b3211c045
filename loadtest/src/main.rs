//! The `imgate-loadtest` binary: parses the command line, raises the open-file limit, runs.

use clap::Parser;
use imgate_loadtest::{raise_nofile_limit, run, Cli, RunOptions};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    raise_nofile_limit();
    let cli = Cli::parse();
    let opts = RunOptions {
        exe: None,
        print: true,
    };
    run(cli, opts).await?;
    Ok(())
}
