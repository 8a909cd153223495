//! `FLEET_PERF_DIR`: a `perf record` attached to one process for one phase. The numbers of
//! such a run are perturbed by the profiler; only the profiles are meant to be read.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::process::send_signal;
use crate::Options;

/// A running `perf record`, or nothing when profiling is off or `perf` cannot run.
pub struct Perf(Option<Child>);

impl Perf {
    pub fn start(opts: &Options, pid: u32, name: &str) -> Perf {
        let Some(dir) = &opts.perf_dir else {
            return Perf(None);
        };
        let _ = std::fs::create_dir_all(dir);
        let out = dir.join(format!("{name}.data"));
        match Command::new("perf")
            .args([
                "record",
                "-q",
                "-F",
                "499",
                "--call-graph",
                "dwarf,16384",
                "-p",
            ])
            .arg(pid.to_string())
            .arg("-o")
            .arg(&out)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
        {
            Ok(child) => {
                eprintln!("perf: recording {name} into {}", out.display());
                Perf(Some(child))
            }
            Err(e) => {
                eprintln!("perf: cannot run perf ({e}); no profile for {name}");
                Perf(None)
            }
        }
    }

    /// SIGINT makes perf write its data and exit.
    pub async fn stop(mut self) {
        if let Some(child) = &mut self.0 {
            send_signal(child.id(), "INT");
            let deadline = Instant::now() + Duration::from_secs(120);
            while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

impl Drop for Perf {
    fn drop(&mut self) {
        if let Some(child) = &mut self.0 {
            if let Ok(None) = child.try_wait() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}
