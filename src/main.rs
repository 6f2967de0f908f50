//! The `hark` binary: parse settings, set up logging, run.

use clap::Parser;
use hark::config::LogFormat;
use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let config = hark::Config::parse();
    // Config has checked that the filter parses.
    let filter = EnvFilter::new(&config.log);
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(false);
    match config.log_format {
        LogFormat::Text => logs.init(),
        LogFormat::Json => logs.json().flatten_event(true).init(),
    }
    // jemalloc returns freed pages to the OS as its decay clock advances,
    // and without background threads that clock only advances when the
    // process allocates: after a burst of large answers to clients that
    // then went away, an idle hark kept the peak RSS until some unrelated
    // burst of activity. Background threads purge on their own timer.
    if let Err(e) = tikv_jemalloc_ctl::background_thread::write(true) {
        tracing::warn!(error = %e, "cannot start jemalloc's background purging");
    }
    match hark::run(config).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("hark: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

// jemalloc rather than glibc's malloc: a fan-out frees on one worker what
// another allocated, which under glibc contends on arena locks (a quarter
// of hark's fan-out CPU was malloc and free in profiles), and jemalloc's page-aligned 8 KiB
// class touches fewer pages of each connection's buffers. Measured in
// benches/RESULTS.md ("jemalloc").
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;
